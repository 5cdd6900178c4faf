"""Write workflows/*.json (UI format) from the compact graphs below and the live node definitions.

Run with ComfyUI's Python: COMFYUI_PATH=/path/to/ComfyUI python tools/build_workflows.py
Widget values are laid out in the front-end's order from the definitions, so a changed node shows up
as a diff here and as a failure in tests/host/test_workflows.py.
"""

import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SVD = "svd_xt.safetensors"
MODELS = dict(model=(1, 0), clip_vision=(1, 1), vae=(1, 2))


def svd_loader():
    return dict(id=1, type="ImageOnlyCheckpointLoader", pos=(0, 0), w=dict(ckpt_name=SVD))


def video_in(frames=300):
    return [dict(id=2, type="LoadVideo", pos=(0, 200), w=dict(file="source.mp4")),
            dict(id=3, type="GetVideoComponents", pos=(0, 560), i=dict(video=(2, 0)))]


def video_out(frames_from, x=1500):
    return [dict(id=90, type="CreateVideo", pos=(x, 0), i=dict(images=frames_from, fps=(3, 2))),
            dict(id=91, type="SaveVideo", pos=(x, 200), i=dict(video=(90, 0)), w=dict(filename_prefix="video/i2vedit")),
            ]


def preview(node_id, source, x, y):
    return dict(id=node_id, type="PreviewImage", pos=(x, y), i=dict(images=source))


def note(text):
    return dict(id=99, type="Note", pos=(-420, 0), size=(400, 260), text=text)


def edit_video(edited_from, extra=None, preset="local", mask=None):
    inputs = dict(MODELS, frames=(3, 0), edited_first_frame=edited_from)
    if mask is not None:
        inputs["mask"] = mask
    return dict(id=10, type="I2VEditEditVideo", pos=(1000, 0), i=inputs, w=dict(preset=preset, **(extra or {})))


FROM_FILE = [svd_loader(), *video_in(), dict(id=4, type="LoadImage", pos=(450, 300), w=dict(image="edited_frame0.png")),
             edit_video((4, 0)), *video_out((10, 0)), preview(92, (10, 1), 1500, 450),
             note("Edit a video from an edited first frame.\n\nChange first: 1) the SVD checkpoint (svd_xt for "
                  "25-frame clips: set frames_per_clip 25; svd: 14), 2) the source video in Load Video, 3) the edited "
                  "frame 0 in Load Image: frame 0 of the same video, edited in any tool, same size.\nThe difference "
                  "map preview shows where the edit departed from the source. First run: several minutes per clip "
                  "(motion LoRA training); turn train_motion_lora off for a quick look.")]

INPAINT = [svd_loader(), *video_in(),
           dict(id=20, type="ImageFromBatch", pos=(450, 0), i=dict(image=(3, 0)), w=dict(batch_index=0, length=1)),
           dict(id=21, type="CheckpointLoaderSimple", pos=(450, 150), w=dict(ckpt_name="sd-v1-5-inpainting.ckpt")),
           dict(id=22, type="LoadImageMask", pos=(450, 300), w=dict(image="mask_frame0.png", channel="alpha")),
           dict(id=23, type="CLIPTextEncode", pos=(750, 150), i=dict(clip=(21, 1)), w=dict(text="a red sports car")),
           dict(id=24, type="CLIPTextEncode", pos=(750, 350), i=dict(clip=(21, 1)), w=dict(text="blurry, artifacts")),
           dict(id=25, type="VAEEncodeForInpaint", pos=(750, 550), i=dict(pixels=(20, 0), vae=(21, 2), mask=(22, 0))),
           dict(id=26, type="KSampler", pos=(1000, 400), i=dict(model=(21, 0), positive=(23, 0), negative=(24, 0),
                                                              latent_image=(25, 0)), w=dict(steps=25, cfg=7.0)),
           dict(id=27, type="VAEDecode", pos=(1000, 750), i=dict(samples=(26, 0), vae=(21, 2))),
           dict(id=10, type="I2VEditEditVideo", pos=(1250, 0), i=dict(MODELS, frames=(3, 0), edited_first_frame=(27, 0),
                                                                    mask=(22, 0))),
           *video_out((10, 0), 1700), preview(92, (27, 0), 1700, 450),
           note("Inpaint frame 0 with an SD inpainting model, then propagate.\n\nChange first: the SD inpainting "
                "checkpoint, the prompt, and the mask (white/alpha = repaint; paint it on frame 0 of your video, same "
                "size). The same mask keeps the source exactly outside the edit. Then the SVD checkpoint and video.")]

INSTRUCT = [svd_loader(), *video_in(),
            dict(id=20, type="ImageFromBatch", pos=(450, 0), i=dict(image=(3, 0)), w=dict(batch_index=0, length=1)),
            dict(id=21, type="CheckpointLoaderSimple", pos=(450, 150), w=dict(ckpt_name="instruct-pix2pix.safetensors")),
            dict(id=23, type="CLIPTextEncode", pos=(750, 150), i=dict(clip=(21, 1)), w=dict(text="make it winter")),
            dict(id=24, type="CLIPTextEncode", pos=(750, 350), i=dict(clip=(21, 1)), w=dict(text="")),
            dict(id=25, type="InstructPixToPixConditioning", pos=(750, 550),
                 i=dict(positive=(23, 0), negative=(24, 0), vae=(21, 2), pixels=(20, 0))),
            dict(id=26, type="KSampler", pos=(1000, 400), i=dict(model=(21, 0), positive=(25, 0), negative=(25, 1),
                                                               latent_image=(25, 2)), w=dict(steps=20, cfg=7.5)),
            dict(id=27, type="VAEDecode", pos=(1000, 750), i=dict(samples=(26, 0), vae=(21, 2))),
            dict(id=10, type="I2VEditEditVideo", pos=(1250, 0), i=dict(MODELS, frames=(3, 0), edited_first_frame=(27, 0)),
                 w=dict(preset="local")),
            *video_out((10, 0), 1700), preview(92, (27, 0), 1700, 450),
            note("Instruct-style edit of frame 0 (InstructPix2Pix), then propagate.\n\nChange first: the "
                 "instruction text ('make it winter'), the InstructPix2Pix checkpoint, then the SVD checkpoint and the "
                 "video. Check the edited frame preview before spending time on the video.")]


def split_pipeline(edited_from, preset, lora_from=None, first_id=30, x=1000):
    nodes = [dict(id=first_id, type="I2VEditSourceClips", pos=(x - 500, 600), i=dict(frames=(3, 0)),
                  w=dict(frames_per_clip=14)),
             dict(id=first_id + 1, type="I2VEditInvert", pos=(x - 250, 600), i=dict(MODELS, clips=(first_id, 0)))]
    inputs = dict(MODELS, inversion=(first_id + 1, 0), edited_first_frames=edited_from)
    if lora_from is not None:
        inputs["motion_lora"] = lora_from
    nodes.append(dict(id=10, type="I2VEditPropagate", pos=(x, 0), i=inputs, w=dict(preset=preset)))
    return nodes


STYLE = [svd_loader(), *video_in(),
         dict(id=20, type="ImageFromBatch", pos=(450, 0), i=dict(image=(3, 0)), w=dict(batch_index=0, length=1)),
         dict(id=21, type="CheckpointLoaderSimple", pos=(450, 150), w=dict(ckpt_name="v1-5-pruned-emaonly.safetensors")),
         dict(id=23, type="CLIPTextEncode", pos=(750, 150), i=dict(clip=(21, 1)), w=dict(text="oil painting, van gogh")),
         dict(id=24, type="CLIPTextEncode", pos=(750, 350), i=dict(clip=(21, 1)), w=dict(text="photo")),
         dict(id=25, type="VAEEncode", pos=(750, 550), i=dict(pixels=(20, 0), vae=(21, 2))),
         dict(id=26, type="KSampler", pos=(1000, 400), i=dict(model=(21, 0), positive=(23, 0), negative=(24, 0),
                                                            latent_image=(25, 0)), w=dict(denoise=0.6)),
         dict(id=27, type="VAEDecode", pos=(1000, 750), i=dict(samples=(26, 0), vae=(21, 2))),
         *split_pipeline((27, 0), "style", lora_from=(40, 0), x=1300),
         dict(id=40, type="I2VEditTrainMotionLora", pos=(1050, 900), i=dict(MODELS, clips=(30, 0), inversion=(31, 0))),
         *video_out((10, 0), 1800), preview(92, (27, 0), 1800, 450),
         note("Style transfer: restyle frame 0 (img2img), propagate with the 'style' preset, which follows the "
              "source's motion longest.\n\nChange first: the style prompt and denoise (0.5-0.7), then the SVD "
              "checkpoint and the video.")]

LONG = [svd_loader(), *video_in(), dict(id=4, type="LoadImage", pos=(450, 300), w=dict(image="edited_frame0.png")),
        *split_pipeline((4, 0), "local", lora_from=(40, 0), x=1300),
        dict(id=40, type="I2VEditTrainMotionLora", pos=(1050, 900), i=dict(MODELS, clips=(30, 0), inversion=(31, 0)),
             w=dict(memory="24gb")),
        dict(id=41, type="I2VEditSaveMotionLora", pos=(1300, 900), i=dict(motion_lora=(40, 0)),
             w=dict(name="i2vedit/my_video")),
        preview(42, (40, 1), 1550, 900),
        dict(id=43, type="I2VEditMetrics", pos=(1800, 600), i=dict(source=(3, 0), output=(10, 0))),
        *video_out((10, 0), 1800), preview(92, (10, 1), 1800, 450),
        note("A long video over several clips, saving the motion LoRA.\n\nChange first: the video and edited "
             "frame 0, frames_per_clip (14 for svd, 25 for svd_xt) and the LoRA name. Clips hand the edit over "
             "through their overlap frame. The saved LoRA (one file per clip) makes the next edit of this video "
             "fast: open 06_reuse_motion_lora.")]

REUSE = [svd_loader(), *video_in(), dict(id=4, type="LoadImage", pos=(450, 300), w=dict(image="edited_frame0.png")),
         *split_pipeline((4, 0), "local", lora_from=(40, 0), x=1300),
         dict(id=40, type="I2VEditLoadMotionLora", pos=(1050, 900), w=dict(lora_name="i2vedit/my_video.safetensors")),
         *video_out((10, 0), 1800), preview(92, (10, 1), 1800, 450),
         note("Reuse a saved motion LoRA: no training.\n\nChange first: pick the LoRA saved for THIS video in Load "
              "Motion LoRA (any file of a _clipNNofMM series loads all of it) and keep the Source Clips settings it "
              "was trained with; then the edited frame 0.")]

WORKFLOWS = {"01_edit_from_file": FROM_FILE, "02_inpaint_first_frame": INPAINT, "03_instruct_edit": INSTRUCT,
             "04_style_transfer": STYLE, "05_long_video_save_lora": LONG, "06_reuse_motion_lora": REUSE}


def widget_values(spec, definition):
    values = []
    overrides = spec.get("w", {})
    for slot in definition.widgets:
        values.append(overrides.get(slot.name, slot.default))
        if slot.values == 2:
            values.append("fixed" if slot.type == "INT" else "image")
    return values


def build(specs, definitions):
    nodes, links, by_id = [], [], {}
    for order, spec in enumerate(specs):
        node = ui_node(spec, order, definitions)
        nodes.append(node)
        by_id[spec["id"]] = node
    for spec in specs:
        target = by_id[spec["id"]]
        for slot_index, slot in enumerate(target["inputs"]):
            src_id, src_slot = spec["i"][slot["name"]]
            link_id = len(links) + 1
            kind = by_id[src_id]["outputs"][src_slot]["type"]
            links.append([link_id, src_id, src_slot, spec["id"], slot_index, kind])
            slot["link"] = link_id
            by_id[src_id]["outputs"][src_slot]["links"].append(link_id)
    return {"last_node_id": max(by_id), "last_link_id": len(links), "nodes": nodes, "links": links, "groups": [],
            "config": {}, "extra": {"ds": {"scale": 0.6, "offset": [450, 50]}}, "version": 0.4}


def ui_node(spec, order, definitions):
    base = {"id": spec["id"], "type": spec["type"], "pos": list(spec["pos"]), "size": list(spec.get("size", (300, 150))),
            "flags": {}, "order": order, "mode": 0, "properties": {"Node name for S&R": spec["type"]}}
    if spec["type"] == "Note":
        return dict(base, inputs=[], outputs=[], widgets_values=[spec["text"]], color="#432", bgcolor="#653")
    definition = definitions[spec["type"]]
    linked = spec.get("i", {})
    inputs = [dict({"name": s.name, "type": s.type, "link": None}, **({"widget": {"name": s.name}} if s.widget else {}))
              for s in definition.inputs if s.name in linked]
    unknown = set(linked) - {s["name"] for s in inputs}
    if unknown:
        raise ValueError(f"{spec['type']} has no link input {sorted(unknown)}")
    outputs = [{"name": t, "type": t, "links": [], "slot_index": k} for k, t in enumerate(definition.outputs)]
    return dict(base, inputs=inputs, outputs=outputs, widgets_values=widget_values(spec, definition))


def main():
    root = Path(os.environ["COMFYUI_PATH"]).resolve()
    sys.path.insert(0, str(root))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    sys.path.insert(1, str(REPO / "tools"))
    from workflow_format import check_workflow, live_definitions

    definitions = live_definitions(REPO)
    for name, specs in WORKFLOWS.items():
        workflow = build(specs, definitions)
        problems = check_workflow(workflow, definitions)
        if problems:
            raise SystemExit(f"{name}: " + "; ".join(problems))
        (REPO / "workflows" / f"{name}.json").write_text(json.dumps(workflow, indent=1) + "\n")
        print("wrote", name)


if __name__ == "__main__":
    main()
