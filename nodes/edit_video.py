"""I2VEdit Edit Video: the common case in one node (source frames + edited frame -> edited video)."""

from dataclasses import replace

import torch
from comfy_api.latest import io

from i2vedit_core.pipeline import edit_video
from i2vedit_core.presets import with_numerics
from i2vedit_core.validation import NODES, check_node_inputs

from .host import (NodeProgress, cancel_check, comfy_backend, frames_to_image, image_to_frames, map_to_image,
                   node_id)
from .invert import inversion_inputs, inversion_settings
from .propagate import edit_settings, mask_inputs, matching_inputs
from .source import clip_inputs, clips_from
from .train import compile_input, training_inputs, training_settings
from .types import CATEGORY, memory_input, model_inputs, seed_input


class EditVideoNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="I2VEditEditVideo", display_name="I2VEdit Edit Video", category=CATEGORY,
            description="Edit a video by editing its first frame: inverts the source, optionally learns its motion "
                        "(motion LoRA) and propagates the edit. Same as Source Clips -> Invert -> Train -> Propagate "
                        "in one node; use those to reuse the inversion or a saved LoRA.",
            inputs=model_inputs() + [
                io.Image.Input("frames", tooltip="The source video as an IMAGE batch."),
                io.Image.Input("edited_first_frame",
                               tooltip="Frame 0 edited, same size as the video (a batch = several edits)."),
            ] + clip_inputs() + inversion_inputs() + [
                io.Boolean.Input("train_motion_lora", default=True,
                                 tooltip="Learn the source motion first (better motion, several minutes). Off: "
                                         "faster, motion from attention matching only."),
            ] + training_inputs() + matching_inputs() + [
                memory_input(),
                seed_input("Seed of every random draw (SARP, training, conditioning noise)."),
            ] + mask_inputs() + [compile_input()],
            outputs=[io.Image.Output(display_name="frames"), io.Image.Output(display_name="difference_map")],
            hidden=[io.Hidden.unique_id])

    @classmethod
    def execute(cls, model, clip_vision, vae, frames, edited_first_frame, mask=None, memory="auto",
                paste_source=True, numerics="default", **widgets) -> io.NodeOutput:
        check_node_inputs(NODES.using(edited_first_frames="edited_first_frame"), frames, edited_first_frame, mask)
        clips = clips_from(frames, **widgets)
        settings = replace(clips.settings, inversion=inversion_settings(**widgets),
                           training=training_settings(**widgets) if widgets["train_motion_lora"] else None,
                           edit=edit_settings(**widgets), memory=memory, paste_source=paste_source)
        settings = with_numerics(settings, numerics, posterior_sample=False)
        edited = image_to_frames(edited_first_frame, "edited first frame")
        progress = NodeProgress(node_id(cls))
        with comfy_backend(model, clip_vision, vae) as backend:
            result = edit_video(backend, clips.frames, edited, settings, progress, cancel_check(),
                                mask=None if mask is None else mask.detach().float().cpu())
        progress.finish()
        out = [e.frames.cpu() for e in result.edits]
        maps = torch.cat([e.difference_map.cpu() for e in result.edits])
        return io.NodeOutput(frames_to_image(torch.cat(out)), map_to_image(maps))
