"""I2VEdit Inversion Sampler: the core's EDM inversion as a SAMPLER for core SamplerCustomAdvanced.

Use it with DisableNoise, a CFGGuider at cfg 1 (or BasicGuider) and an ascending schedule that starts
above 0, e.g. FlipSigmas(KarrasScheduler(25, 700, 0.002)): the output latent is the source's noise,
which the same guider with a descending schedule and euler turns back into the video.
"""

import torch
from comfy_api.latest import io

from i2vedit_core.sampling import invert

from .types import CATEGORY


def inversion_function(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """k-diffusion sampler contract (COMFYUI_NOTES 4.3): upward deterministic Euler, returns x at sigmas[-1]."""
    check_ascending(sigmas)
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])

    def denoiser(latent, sigma, step):
        return model(latent, sigma * s_in, **extra_args)

    def report(info):
        if callback is not None:
            callback({"x": info["x"], "i": info["i"], "sigma": info["sigma"], "sigma_hat": info["sigma"],
                      "denoised": info["denoised"]})

    dtype = x.dtype
    return invert(denoiser, x, sigmas, callback=report)[-1].to(dtype)


def check_ascending(sigmas: torch.Tensor) -> None:
    if len(sigmas) < 2 or float(sigmas[0]) <= 0 or not bool((sigmas[1:] > sigmas[:-1]).all()):
        raise ValueError("I2VEdit Inversion Sampler needs ascending sigmas that start above 0: put FlipSigmas after "
                         "the scheduler (sigma 0 first gives NaN), and leave the schedule's denoise at 1.0")


class InversionSamplerNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="I2VEditInversionSampler", display_name="I2VEdit Inversion Sampler",
            category=CATEGORY + "/sampling",
            description="A SAMPLER for SamplerCustomAdvanced that inverts a latent into noise (deterministic EDM Euler "
                        "up the schedule). Give it DisableNoise, cfg 1 and FlipSigmas(scheduler).",
            inputs=[],
            outputs=[io.Sampler.Output(display_name="sampler")])

    @classmethod
    def execute(cls) -> io.NodeOutput:
        import comfy.samplers

        return io.NodeOutput(comfy.samplers.KSAMPLER(inversion_function))
