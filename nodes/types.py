"""The pack's custom link types and menu category (V3 `io.Custom`: link-only sockets)."""

from comfy_api.latest import io

from i2vedit_core.memory import CHOICES as MEMORY_CHOICES
from i2vedit_core.presets import NUMERICS

CATEGORY = "I2VEdit"

Clips = io.Custom("I2VEDIT_CLIPS")
Inversion = io.Custom("I2VEDIT_INVERSION")
MotionLora = io.Custom("I2VEDIT_MOTION_LORA")


def model_inputs():
    """MODEL, CLIP_VISION, VAE as the Image Only Checkpoint Loader gives them."""
    return [
        io.Model.Input("model", tooltip="SVD MODEL from Image Only Checkpoint Loader (img2vid). It is cloned, "
                                        "never modified."),
        io.ClipVision.Input("clip_vision", tooltip="CLIP_VISION from the same Image Only Checkpoint Loader."),
        io.Vae.Input("vae", tooltip="VAE from the same Image Only Checkpoint Loader (SVD's video VAE)."),
    ]


def memory_input():
    """The memory policy (i2vedit_core.memory) of every node that runs the UNet."""
    return io.Combo.Input("memory", options=list(MEMORY_CHOICES), default="auto",
                          tooltip="auto: pick from the GPU's free memory. fast: no savings. 24gb: recompute most "
                                  "layers in training (about 17 GiB). 12gb: recompute every layer, decode 2 frames at a "
                                  "time, unload other models first (slowest). After an out-of-memory error, pick "
                                  "the next setting down.")


def numerics_input():
    """The numerics preset (i2vedit_core.presets) of the nodes that make an inversion."""
    return io.Combo.Input("numerics", options=list(NUMERICS), default="default",
                          tooltip="default: this pack's numerical choices. official: the official I2VEdit code's "
                                  "(source attention one step later, stage-2 exception, f/F threshold ramp, 8-bit "
                                  "conditioning; ComfyUI's VAE gives the posterior mode, not a draw). Edits made from "
                                  "this inversion follow it. See docs/FIDELITY.md.")


def seed_input(tooltip: str):
    # Not named "seed" and no control_after_generate: the front-end gives those a "randomize" control,
    # and a seed that changes every queue would redo the (cached) inversion and training each time.
    return io.Int.Input("random_seed", default=0, min=0, max=0xffffffffffffffff, tooltip=tooltip)
