"""Write example_workflows/*.json (UI format) from the compact graphs below and the live node definitions.

Run with ComfyUI's Python: COMFYUI_PATH=/path/to/ComfyUI python tools/build_workflows.py
Widget values are laid out in the front-end's order from the definitions, so a changed node shows up
as a diff here and as a failure in tests/host/test_workflows.py. Positions are computed (tools/workflow_layout.py):
each workflow is columns of titled stages (groups), nodes stacked inside them; tests/host/test_browser.py checks
in the real front-end that no two nodes overlap, before and after a (simulated) run.
"""

import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FOLDER = REPO / "example_workflows"
SVD = "svd_xt.safetensors"
MODELS = dict(model=(1, 0), clip_vision=(1, 1), vae=(1, 2))


def stage(title, *columns):
    return dict(title=title, columns=[list(c) for c in columns])


def svd_stage():
    return stage("SVD checkpoint", [dict(id=1, type="ImageOnlyCheckpointLoader", w=dict(ckpt_name=SVD), wd=340)])


def video_stage(title="Source video"):
    return stage(title, [dict(id=2, type="LoadVideo", w=dict(file="source.mp4")),
                         dict(id=3, type="GetVideoComponents", i=dict(video=(2, 0)))])


def edited_file_stage():
    return stage("Edited frame 0", [dict(id=4, type="LoadImage", w=dict(image="edited_frame0.png"))])


def result_stage(frames_from, map_from, map_title="difference map"):
    return stage("Result", [dict(id=90, type="CreateVideo", i=dict(images=frames_from, fps=(3, 2))),
                            dict(id=91, type="SaveVideo", i=dict(video=(90, 0)), w=dict(filename_prefix="video/i2vedit")),
                            dict(id=92, type="PreviewImage", title=map_title, i=dict(images=map_from))])


def note(text):
    return dict(id=99, type="Note", text=text)


def frame0():
    return dict(id=20, type="ImageFromBatch", i=dict(image=(3, 0)), w=dict(batch_index=0, length=1))


def edit_video(edited_from, preset="local", mask=None):
    inputs = dict(MODELS, frames=(3, 0), edited_first_frame=edited_from)
    if mask is not None:
        inputs["mask"] = mask
    return dict(id=10, type="I2VEditEditVideo", i=inputs, w=dict(preset=preset))


def sd_edit(checkpoint, positive, negative, latent, sampler, edit_nodes=(), image=None):
    """Frame 0 through an SD1.5 checkpoint: loader, prompts, the latent/conditioning node(s), KSampler, decode."""
    return stage("Edit frame 0 (SD1.5, small GPUs)",
                 [frame0(), dict(id=21, type="CheckpointLoaderSimple", w=dict(ckpt_name=checkpoint)), *edit_nodes],
                 [dict(id=23, type="CLIPTextEncode", i=dict(clip=(21, 1)), w=dict(text=positive), h=130),
                  dict(id=24, type="CLIPTextEncode", i=dict(clip=(21, 1)), w=dict(text=negative), h=130), latent],
                 [dict(id=26, type="KSampler", i=sampler[0], w=sampler[1]),
                  dict(id=27, type="VAEDecode", i=dict(samples=(26, 0), vae=(21, 2))),
                  *([image] if image else [])])


FROM_FILE = dict(
    note=note("Edit a video from an edited first frame.\n\nChange first:\n1) the SVD checkpoint (svd_xt: set "
              "frames_per_clip 25; svd: 14),\n2) the source video in Load Video,\n3) the edited frame 0 in Load Image: "
              "frame 0 of the same video, edited in any tool, same size.\n\nThe difference map shows where the edit "
              "departed from the source. First run: several minutes per clip (motion LoRA training); turn "
              "train_motion_lora off for a quick look."),
    columns=[[svd_stage(), video_stage()], [edited_file_stage()],
             [stage("Propagate the edit", [edit_video((4, 0))])], [result_stage((10, 0), (10, 1))]])

INPAINT = dict(
    note=note("Inpaint frame 0 with an SD1.5 inpainting model, then propagate.\n\nChange first:\n1) the SD "
              "inpainting checkpoint and the prompt,\n2) the mask (white/alpha = repaint; paint it on frame 0 of your "
              "video, same size): the same mask keeps the source exactly outside the edit,\n3) the SVD checkpoint and "
              "the video."),
    columns=[[svd_stage(), video_stage()],
             [sd_edit("sd-v1-5-inpainting.ckpt", "a red sports car", "blurry, artifacts",
                      dict(id=25, type="VAEEncodeForInpaint", i=dict(pixels=(20, 0), vae=(21, 2), mask=(22, 0))),
                      (dict(model=(21, 0), positive=(23, 0), negative=(24, 0), latent_image=(25, 0)),
                       dict(steps=25, cfg=7.0)),
                      [dict(id=22, type="LoadImageMask", w=dict(image="mask_frame0.png", channel="alpha"))])],
             [stage("Propagate the edit", [edit_video((27, 0), mask=(22, 0))])],
             [result_stage((10, 0), (27, 0), "edited frame 0")]])


def instruct_edit():
    """Frame 0 edited by InstructPix2Pix (SD1.5) with a 'make it winter' instruction."""
    return sd_edit("instruct-pix2pix.safetensors", "make it winter", "",
                   dict(id=25, type="InstructPixToPixConditioning",
                        i=dict(positive=(23, 0), negative=(24, 0), vae=(21, 2), pixels=(20, 0))),
                   (dict(model=(21, 0), positive=(25, 0), negative=(25, 1), latent_image=(25, 2)),
                    dict(steps=20, cfg=7.5)))


INSTRUCT = dict(
    note=note("Instruct-style edit of frame 0 (InstructPix2Pix, SD1.5), then propagate.\n\nChange first:\n1) the "
              "instruction text ('make it winter'),\n2) the InstructPix2Pix checkpoint,\n3) the SVD checkpoint and the "
              "video.\n\nCheck the edited frame 0 preview before spending time on the video. On a big GPU, "
              "07_qwen_image_edit follows instructions far better."),
    columns=[[svd_stage(), video_stage()],
             [instruct_edit()],
             [stage("Propagate the edit", [edit_video((27, 0))])],
             [result_stage((10, 0), (27, 0), "edited frame 0")]])


def split_stages(edited_from, preset, lora_stage):
    """Source Clips -> Invert (-> motion LoRA stage) -> Propagate, as separate, cached stages."""
    inputs = dict(MODELS, inversion=(31, 0), edited_first_frames=edited_from, motion_lora=(40, 0))
    return [stage("Clips and inversion", [dict(id=30, type="I2VEditSourceClips", i=dict(frames=(3, 0)),
                                                w=dict(frames_per_clip=14)),
                                           dict(id=31, type="I2VEditInvert", i=dict(MODELS, clips=(30, 0)))]),
            lora_stage], stage("Propagate the edit", [dict(id=10, type="I2VEditPropagate", i=inputs,
                                                           w=dict(preset=preset))])


def train_stage(*extra, memory="auto"):
    return stage("Motion LoRA", [dict(id=40, type="I2VEditTrainMotionLora", i=dict(MODELS, clips=(30, 0),
                                                                                  inversion=(31, 0)),
                                      w=dict(memory=memory)), *extra])


STYLE_PREP, STYLE_PROPAGATE = split_stages((27, 0), "style", train_stage())
STYLE = dict(
    note=note("Style transfer: restyle frame 0 (SD1.5 img2img), propagate with the 'style' preset, which follows "
              "the source's motion longest.\n\nChange first:\n1) the style prompt and the KSampler denoise "
              "(0.5-0.7),\n2) the SVD checkpoint and the video."),
    columns=[[svd_stage(), video_stage()],
             [sd_edit("v1-5-pruned-emaonly.safetensors", "oil painting, van gogh", "photo",
                      dict(id=25, type="VAEEncode", i=dict(pixels=(20, 0), vae=(21, 2))),
                      (dict(model=(21, 0), positive=(23, 0), negative=(24, 0), latent_image=(25, 0)),
                       dict(denoise=0.6)))],
             STYLE_PREP, [STYLE_PROPAGATE], [result_stage((10, 0), (27, 0), "edited frame 0")]])

LONG_PREP, LONG_PROPAGATE = split_stages((4, 0), "local", train_stage(
    dict(id=41, type="I2VEditSaveMotionLora", i=dict(motion_lora=(40, 0)), w=dict(name="i2vedit/my_video")),
    dict(id=42, type="PreviewImage", title="training loss", i=dict(images=(40, 1))), memory="24gb"))
LONG = dict(
    note=note("A long video over several clips, saving the motion LoRA.\n\nChange first:\n1) the video and the "
              "edited frame 0,\n2) frames_per_clip (14 for svd, 25 for svd_xt),\n3) the LoRA name.\n\nClips hand the "
              "edit over through their overlap frame. The saved LoRA (one file per clip) makes the next edit of this "
              "video fast: open 06_reuse_motion_lora."),
    columns=[[svd_stage(), video_stage()], [edited_file_stage()], LONG_PREP,
             [LONG_PROPAGATE, stage("Metrics", [dict(id=43, type="I2VEditMetrics",
                                                     i=dict(source=(3, 0), output=(10, 0)))])],
             [result_stage((10, 0), (10, 1))]])

REUSE_PREP, REUSE_PROPAGATE = split_stages((4, 0), "local", stage("Saved motion LoRA", [dict(
    id=40, type="I2VEditLoadMotionLora", w=dict(lora_name="i2vedit/my_video.safetensors"))]))
REUSE = dict(
    note=note("Reuse a saved motion LoRA: no training.\n\nChange first:\n1) in Load Motion LoRA, the LoRA saved "
              "for THIS video (any file of a _clipNNofMM series loads all of it),\n2) keep the Source Clips settings "
              "it was trained with,\n3) the edited frame 0."),
    columns=[[svd_stage(), video_stage()], [edited_file_stage()], REUSE_PREP, [REUSE_PROPAGATE],
             [result_stage((10, 0), (10, 1))]])

QWEN = dict(
    note=note("Edit frame 0 with an instruction (Qwen-Image-Edit, native in ComfyUI), then propagate.\n\nChange "
              "first:\n1) the instruction in the upper Qwen text box,\n2) the Qwen-Image-Edit files: "
              "qwen_image_edit_fp8_e4m3fn in models/diffusion_models, qwen_2.5_vl_7b_fp8_scaled in "
              "models/text_encoders, qwen_image_vae in models/vae (about 30 GB; a 24 GB+ GPU),\n3) the SVD checkpoint "
              "and the video.\n\nFrame 0 is edited at about 1 megapixel and scaled back to the video's size. Check "
              "the edited frame 0 preview first. Small GPU: 03_instruct_edit (SD1.5)."),
    columns=[[svd_stage(), video_stage()],
             [stage("Qwen-Image-Edit models", [
                 dict(id=50, type="UNETLoader", w=dict(unet_name="qwen_image_edit_fp8_e4m3fn.safetensors")),
                 dict(id=51, type="CLIPLoader", w=dict(clip_name="qwen_2.5_vl_7b_fp8_scaled.safetensors",
                                                       type="qwen_image")),
                 dict(id=52, type="VAELoader", w=dict(vae_name="qwen_image_vae.safetensors")),
                 dict(id=53, type="ModelSamplingAuraFlow", i=dict(model=(50, 0)), w=dict(shift=3.0)),
                 dict(id=54, type="CFGNorm", i=dict(model=(53, 0)), w=dict(strength=1.0))])],
             [stage("Edit frame 0 (Qwen-Image-Edit)",
                    [frame0(),
                     dict(id=55, type="ImageScaleToTotalPixels", i=dict(image=(20, 0)),
                          w=dict(upscale_method="lanczos", megapixels=1.0)),
                     dict(id=56, type="VAEEncode", i=dict(pixels=(55, 0), vae=(52, 0))),
                     dict(id=59, type="GetImageSize", i=dict(image=(20, 0)))],
                    [dict(id=57, type="TextEncodeQwenImageEdit", title="instruction", i=dict(clip=(51, 0), vae=(52, 0), image=(55, 0)),
                          w=dict(prompt="make it a snowy winter day, keep everything else the same"), h=150),
                     dict(id=58, type="TextEncodeQwenImageEdit", title="negative (leave empty)", i=dict(clip=(51, 0), vae=(52, 0), image=(55, 0)),
                          w=dict(prompt=""), h=150)],
                    [dict(id=26, type="KSampler", i=dict(model=(54, 0), positive=(57, 0), negative=(58, 0),
                                                         latent_image=(56, 0)),
                          w=dict(steps=20, cfg=2.5, sampler_name="euler", scheduler="simple")),
                     dict(id=27, type="VAEDecode", i=dict(samples=(26, 0), vae=(52, 0))),
                     dict(id=28, type="ImageScale", title="back to the video's size",
                          i=dict(image=(27, 0), width=(59, 0), height=(59, 1)), w=dict(upscale_method="lanczos"))])],
             [stage("Propagate the edit", [edit_video((28, 0))])],
             [result_stage((10, 0), (28, 0), "edited frame 0")]])

COMPOSABLE = dict(
    note=note("The composable parts: I2VEdit's matched denoising as a SAMPLER in core SamplerCustomAdvanced, with "
              "the motion LoRA on the MODEL through core LoraLoaderModelOnly.\n\nChange first:\n1) the instruction "
              "and the InstructPix2Pix checkpoint,\n2) in LoraLoaderModelOnly, the motion LoRA trained for THIS video "
              "and these Source Clips settings (05 saves it; for several clips pick the _clip01ofNN file),\n3) the "
              "SVD checkpoint and the video.\n\nIt edits clip 0 (the first frames_per_clip frames). KarrasScheduler "
              "keeps the inversion's steps, sigma 700 to 0.002; the guider's cfg is replaced by the Matched "
              "Sampler's min/max guidance. Connect a MASK to the sampler to keep the source outside it."),
    columns=[[svd_stage(), video_stage()],
             [instruct_edit()],
             [stage("Clips and inversion", [dict(id=30, type="I2VEditSourceClips", i=dict(frames=(3, 0)),
                                                 w=dict(frames_per_clip=14)),
                                            dict(id=31, type="I2VEditInvert", i=dict(MODELS, clips=(30, 0)))]),
              stage("Motion LoRA on the MODEL", [dict(id=40, type="LoraLoaderModelOnly", i=dict(model=(1, 0)),
                                                      w=dict(lora_name="i2vedit/my_video.safetensors"))])],
             [stage("Matched sampling (clip 0)",
                    [dict(id=60, type="I2VEditEditConditioning", i=dict(MODELS, inversion=(31, 0),
                                                                        edited_first_frame=(27, 0))),
                     dict(id=61, type="CFGGuider", i=dict(model=(40, 0), positive=(60, 0), negative=(60, 1)),
                          w=dict(cfg=2.5)),
                     dict(id=62, type="KarrasScheduler", w=dict(steps=25, sigma_max=700.0, sigma_min=0.002)),
                     dict(id=63, type="DisableNoise")],
                    [dict(id=64, type="I2VEditMatchedSampler", i=dict(MODELS, model=(40, 0), inversion=(31, 0))),
                     dict(id=65, type="SamplerCustomAdvanced", i=dict(noise=(63, 0), guider=(61, 0), sampler=(64, 0),
                                                                      sigmas=(62, 0), latent_image=(60, 2))),
                     dict(id=66, type="VAEDecode", i=dict(samples=(65, 0), vae=(1, 2)))])],
             [result_stage((66, 0), (27, 0), "edited frame 0")]])

WORKFLOWS = {"01_edit_from_file": FROM_FILE, "02_inpaint_first_frame": INPAINT, "03_instruct_edit": INSTRUCT,
             "04_style_transfer": STYLE, "05_long_video_save_lora": LONG, "06_reuse_motion_lora": REUSE,
             "07_qwen_image_edit": QWEN, "08_composable_matched_sampler": COMPOSABLE}


def widget_values(spec, definition):
    values = []
    overrides = spec.get("w", {})
    unknown = set(overrides) - {s.name for s in definition.widgets}
    if unknown:
        raise ValueError(f"{spec['type']} has no widget {sorted(unknown)}")
    for slot in definition.widgets:
        values.append(overrides.get(slot.name, slot.default))
        if slot.values == 2:
            values.append("fixed" if slot.type == "INT" else "image")
    return values


def build(workflow, definitions):
    from workflow_layout import layout

    specs, groups, ds = layout(workflow, definitions)
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
    return {"last_node_id": max(by_id), "last_link_id": len(links), "nodes": nodes, "links": links, "groups": groups,
            "config": {}, "extra": {"ds": ds}, "version": 0.4}


def ui_node(spec, order, definitions):
    base = {"id": spec["id"], "type": spec["type"], "pos": list(spec["pos"]), "size": list(spec["size"]),
            "flags": {}, "order": order, "mode": 0, "properties": {"Node name for S&R": spec["type"]}}
    if "title" in spec:
        base["title"] = spec["title"]
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
    for name, workflow in WORKFLOWS.items():
        built = build(workflow, definitions)
        problems = check_workflow(built, definitions)
        if problems:
            raise SystemExit(f"{name}: " + "; ".join(problems))
        (FOLDER / f"{name}.json").write_text(json.dumps(built, indent=1) + "\n")
        print("wrote", name)


if __name__ == "__main__":
    main()
