"""I2VEdit Propagate: the edited first frame(s) carried through the whole video by matched denoising."""

from dataclasses import replace

import torch
from comfy_api.latest import io

from i2vedit_core.attention import PRESETS, MatchSettings, TemporalSelector
from i2vedit_core.editing import EditSettings
from i2vedit_core.pipeline import check_edited_frames, keep_source_outside, latent_mask, propagate
from i2vedit_core.presets import edit_with_numerics, inversion_numerics
from i2vedit_core.validation import NODES, check_node_inputs

from .artifacts import check_same_clips
from .host import NodeProgress, cancel_check, comfy_backend, frames_to_image, image_to_frames, map_to_image, node_id
from .types import CATEGORY, Inversion, MotionLora, memory_input, model_inputs, seed_input

PRESET_NAMES = ["local", "style", "shape", "custom"]


def matching_inputs():
    """Widgets of matched editing, shared with the all-in-one node. The js fills beta1/beta2 from the preset,
    reading the core's table from the preset input's definition (its only copy)."""
    local = PRESETS["local"]
    preset = io.Combo.Input("preset", options=PRESET_NAMES, default="local",
                            tooltip="How long the edit follows the source's temporal attention. local: object "
                                    "edits (0.5/0.8); style: restyling, keeps motion longest (0.8/0.9); shape: edits "
                                    "that change shape (0.4/0.5); custom: use beta1/beta2 below.")
    preset.extra_dict["presets"] = {name: list(betas) for name, betas in PRESETS.items()}  # js/i2vedit.js reads it
    return [
        preset,
        io.Float.Input("beta1", default=local[0], min=0.0, max=1.0, step=0.01,
                       tooltip="Fraction of the steps during which every temporal layer copies the source's "
                               "attention (used when preset is custom)."),
        io.Float.Input("beta2", default=local[1], min=0.0, max=1.0, step=0.01,
                       tooltip="Until this fraction of the steps the coarse temporal layers still copy the source "
                               "(used when preset is custom). Must be >= beta1."),
        io.Float.Input("threshold_first", default=0.35, min=0.0, max=1.0, step=0.01,
                       tooltip="Spatial matching threshold at the first frame: higher keeps more of the source's "
                               "spatial attention (less drift, less edit)."),
        io.Float.Input("threshold_last", default=0.35, min=0.0, max=1.0, step=0.01,
                       tooltip="Spatial matching threshold at the last frame of a clip (linear in between)."),
        io.Float.Input("min_guidance", default=1.0, min=1.0, max=20.0, step=0.1,
                       tooltip="CFG scale at the first frame of each clip (SVD: 1.0)."),
        io.Float.Input("max_guidance", default=2.5, min=1.0, max=20.0, step=0.1,
                       tooltip="CFG scale at the last frame of each clip (SVD: 2.5-3.0)."),
    ]


def edit_settings(preset, beta1, beta2, threshold_first, threshold_last, min_guidance, max_guidance, random_seed,
                  **_) -> EditSettings:
    temporal = TemporalSelector(beta1, beta2) if preset == "custom" else TemporalSelector.preset(preset)
    matching = MatchSettings(thresholds=(threshold_first, threshold_last), temporal=temporal)
    return EditSettings(matching=matching, min_guidance=min_guidance, max_guidance=max_guidance, seed=random_seed)


def edits_follow(inverted, edit: EditSettings) -> EditSettings:
    """`edit` with the numerics the inversion was made with (the `numerics` widget of I2VEdit Invert)."""
    return edit_with_numerics(edit, inversion_numerics(inverted.settings.inversion))


def mask_inputs():
    """MASK and its paste option, shared with the all-in-one node."""
    return [
        io.Mask.Input("mask", optional=True,
                      tooltip="Optional MASK at the video's size (1 = may change): outside it the denoising is held "
                              "on the source's own trajectory, for local edits."),
        io.Boolean.Input("paste_source", default=True,
                         tooltip="With a MASK: paste the source's pixels back outside it, so the background is "
                                 "exactly the source (off: the background is the source through SVD's VAE)."),
    ]


def run_propagation(model, clip_vision, vae, inverted, loras, edited_image, edit, mask=None, node_id=None,
                    memory="auto", paste_source=True):
    """-> (frames IMAGE of every edit one after another, difference-map IMAGE likewise)."""
    if loras is not None:
        check_same_clips(inverted, loras)
    source = inverted.clips.frames
    check_node_inputs(NODES, edited=edited_image, mask=mask, video_hw=tuple(source.shape[-2:]),
                      video_frames=len(source))
    video = inverted.clips.video
    edits = check_edited_frames(image_to_frames(edited_image, "edited first frame"), video.fit)
    settings = replace(inverted.settings, edit=edits_follow(inverted, edit), memory=memory)
    mask = None if mask is None else mask.detach().float().cpu()
    progress = NodeProgress(node_id)
    with comfy_backend(model, clip_vision, vae) as backend:
        if backend.identity() != inverted.model_identity:
            raise ValueError("the inversion was made with a different MODEL: connect the same SVD model to "
                             "I2VEdit Invert and I2VEdit Propagate")
        results = propagate(backend, video, inverted.on(backend.device), None if loras is None else list(loras.loras),
                            edits, settings, progress, cancel_check(),
                            mask=None if mask is None else latent_mask(mask, video))
    progress.finish()
    frames = [r.frames.cpu() for r in results]
    if mask is not None and paste_source:
        frames = [keep_source_outside(f, inverted.clips.frames, mask) for f in frames]
    return frames_to_image(torch.cat(frames)), map_to_image(torch.cat([r.difference_map.cpu() for r in results]))


class PropagateNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="I2VEditPropagate", display_name="I2VEdit Propagate", category=CATEGORY,
            description="Carries the edited first frame through the video: denoises the inverted source under the "
                        "edit while copying the source's attention where the edit did not change the picture. An "
                        "IMAGE batch of several edited frames gives several edited videos, one after another.",
            inputs=model_inputs() + [
                Inversion.Input("inversion", tooltip="From I2VEdit Invert (same MODEL)."),
                io.Image.Input("edited_first_frames",
                               tooltip="Frame 0 of the video, edited (same size as the video). A batch of several "
                                       "edits is propagated edit after edit."),
            ] + matching_inputs() + [
                memory_input(),
                seed_input("Seed of the conditioning noise of the edit."),
                MotionLora.Input("motion_lora", optional=True,
                                 tooltip="Optional motion LoRA (Train or Load Motion LoRA): better motion fidelity."),
            ] + mask_inputs(),
            outputs=[io.Image.Output(display_name="frames"), io.Image.Output(display_name="difference_map")],
            hidden=[io.Hidden.unique_id])

    @classmethod
    def execute(cls, model, clip_vision, vae, inversion, edited_first_frames, motion_lora=None, mask=None,
                memory="auto", paste_source=True, **widgets) -> io.NodeOutput:
        frames, maps = run_propagation(model, clip_vision, vae, inversion, motion_lora, edited_first_frames,
                                       edit_settings(**widgets), mask, node_id(cls), memory, paste_source)
        return io.NodeOutput(frames, maps)
