"""I2VEdit Invert: SARP + EDM inversion of every source clip (shared by every edit of the video)."""

from dataclasses import replace

from comfy_api.latest import io

from i2vedit_core.inversion import InversionSettings
from i2vedit_core.pipeline import invert_video
from i2vedit_core.presets import is_official
from i2vedit_core.sarp import SARP_ALPHA

from .artifacts import InvertedVideo, move_inversion
from .host import NodeProgress, cancel_check, comfy_backend, node_id
from .types import CATEGORY, Clips, Inversion, memory_input, model_inputs, numerics_input, seed_input


def inversion_inputs():
    """Widgets of the inversion, shared with the all-in-one node."""
    return [
        io.Int.Input("steps", default=25, min=2, max=200,
                     tooltip="Inversion (and later denoising) steps. 25 is the paper's setting; fewer is faster "
                             "and less faithful."),
        io.Boolean.Input("sarp", default=True,
                         tooltip="Smooth-area random perturbation: adds a little noise to flat regions so they "
                                 "invert into usable noise (paper section 3.2). Keep on."),
        io.Float.Input("sarp_scale", default=SARP_ALPHA, min=0.0, max=1.0, step=0.001,
                       tooltip="Strength of the SARP noise (paper: 0.005). Ignored when sarp is off."),
        numerics_input(),
    ]


def inversion_settings(steps, sarp, sarp_scale, random_seed, numerics="default", **_) -> InversionSettings:
    """numerics "official": the 8-bit conditioning; the VAE posterior mode stays (ComfyUI's VAE has no draw)."""
    return InversionSettings(steps=steps, sarp_alpha=sarp_scale if sarp else 0.0, seed=random_seed,
                             cond_8bit=is_official(numerics))


def run_inversion(model, clip_vision, vae, clips, settings, node_id=None, memory="auto") -> InvertedVideo:
    settings = replace(clips.settings, inversion=settings, memory=memory)
    progress = NodeProgress(node_id)
    with comfy_backend(model, clip_vision, vae) as backend:
        inversions = invert_video(backend, clips.video, settings, progress, cancel_check())
        identity = backend.identity()
    progress.finish()
    return InvertedVideo(clips, tuple(move_inversion(i, "cpu") for i in inversions), settings, identity)


class InvertNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="I2VEditInvert", display_name="I2VEdit Invert", category=CATEGORY,
            description="Inverts every source clip into SVD noise (SARP + deterministic EDM inversion). Computed once "
                        "and reused by every edit and every Propagate of the same video.",
            inputs=model_inputs() + [Clips.Input("clips", tooltip="From I2VEdit Source Clips.")]
                   + inversion_inputs() + [memory_input(), seed_input("Seed of the SARP noise and conditioning noise.")],
            outputs=[Inversion.Output(display_name="inversion")],
            hidden=[io.Hidden.unique_id])

    @classmethod
    def execute(cls, model, clip_vision, vae, clips, memory="auto", **widgets) -> io.NodeOutput:
        inverted = run_inversion(model, clip_vision, vae, clips, inversion_settings(**widgets), node_id(cls), memory)
        return io.NodeOutput(inverted)
