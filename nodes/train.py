"""I2VEdit Train Motion LoRA: one motion LoRA per source clip, plus its loss curve."""

from dataclasses import replace

from comfy_api.latest import io

from i2vedit_core.lora import LoraSpec
from i2vedit_core.pipeline import train_loras
from i2vedit_core.training import TrainingSettings

from .artifacts import MotionLoras
from .host import NodeProgress, cancel_check, comfy_backend, node_id
from .plots import line_chart
from .types import CATEGORY, Clips, Inversion, MotionLora, memory_input, model_inputs, seed_input


def training_inputs():
    """Widgets of motion-LoRA training, shared with the all-in-one node."""
    return [
        io.Int.Input("training_steps", default=250, min=1, max=5000,
                     tooltip="Optimiser steps per clip (paper: 250). More fits the motion more closely."),
        io.Int.Input("rank", default=32, min=1, max=256,
                     tooltip="LoRA rank (paper: 32). Higher holds more motion detail and is slower."),
        io.Float.Input("learning_rate", default=5e-4, min=1e-6, max=1e-2, step=1e-5, round=1e-6,
                       tooltip="AdamW learning rate (paper: 5e-4)."),
    ]


def compile_input():
    """torch.compile for training (TrainingSettings.compile). Last among a node's inputs, so that workflows saved
    before it existed keep their widget values in place."""
    return io.Boolean.Input("compile_training", default=False, optional=True,
                            tooltip="torch.compile the UNet for training (NVIDIA GPU with Triton). The first run "
                                    "compiles for about 6 minutes (about 2 after a ComfyUI restart, from the disk "
                                    "cache). The default (uncompiled) training now runs as fast as compiled "
                                    "training did when it was last measured, so this rarely pays; with 24gb or "
                                    "12gb it is slower. Off: the memory setting decides (no compile).")


def training_settings(training_steps, rank, learning_rate, random_seed, compile_training=False,
                      **_) -> TrainingSettings:
    return TrainingSettings(steps=training_steps, learning_rate=learning_rate, lora=LoraSpec(rank=rank),
                            seed=random_seed, compile=True if compile_training else None)


def run_training(model, clip_vision, vae, clips, training, inversion=None, node_id=None,
                 memory="auto") -> MotionLoras:
    settings = replace(clips.settings, training=training, memory=memory)
    if inversion is not None:  # skip-interval training of clips >= 1 inverts clip 0 the same way
        settings = replace(settings, inversion=inversion.settings.inversion)
    progress = NodeProgress(node_id)
    with comfy_backend(model, clip_vision, vae) as backend:
        loras = train_loras(backend, clips.video, settings, progress, cancel_check())
    progress.finish()
    losses = tuple(tuple(progress.losses.get(k, ())) for k in range(len(loras)))
    return MotionLoras(tuple(loras), losses)


class TrainMotionLoraNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="I2VEditTrainMotionLora", display_name="I2VEdit Train Motion LoRA", category=CATEGORY,
            description="Learns the source video's motion as a LoRA on SVD's temporal layers (one per clip), so the "
                        "edited video moves like the source. Save it to skip this next time.",
            inputs=model_inputs() + [Clips.Input("clips", tooltip="From I2VEdit Source Clips.")]
                   + training_inputs() + [memory_input(), seed_input("Seed of the noise levels, noise and LoRA initialisation."),
                                          Inversion.Input("inversion", optional=True,
                                                          tooltip="Optional: the video's I2VEdit Invert output, so "
                                                                  "multi-clip training uses its inversion settings."),
                                          compile_input()],
            outputs=[MotionLora.Output(display_name="motion_lora"), io.Image.Output(display_name="loss_curve")],
            hidden=[io.Hidden.unique_id])

    @classmethod
    def execute(cls, model, clip_vision, vae, clips, inversion=None, memory="auto", **widgets) -> io.NodeOutput:
        loras = run_training(model, clip_vision, vae, clips, training_settings(**widgets), inversion,
                             node_id(cls), memory)
        return io.NodeOutput(loras, line_chart(loras.losses, "motion LoRA training loss (one line per clip)"))
