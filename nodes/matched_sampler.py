"""I2VEdit Matched Sampler: the core's matched denoising (ALGORITHM §5) as a SAMPLER for SamplerCustomAdvanced.

The counterpart of the Inversion Sampler. Each Euler step:
  1. a base-model forward (LoRA off) on the stored source inversion latent at the step's sigma with the source
     conditioning, capturing spatial q/k and temporal probabilities (`controller.source_pass()`);
  2. the guider's own call (any CFGGuider / VideoLinearCFGGuidance upstream), whose UNet calls get an edit pass whose
     rows follow ComfyUI's batching: a `model_function_wrapper` reads each call's `cond_or_uncond` (0 -> "cond",
     1 -> "uncond") and puts `controller.edit_pass(rows)` in that call's transformer_options, so matching runs on the
     conditional rows only, however calc_cond_batch batches them;
  3. a deterministic Euler step.

The 32 attn1 object patches live on the ComfyBackend's clone of MODEL. The clone shares the guider's BaseModel, and
loading it (step 1) makes ComfyUI detach the guider's own patcher of the same model, so the guider's UNet call in
step 2 runs through the patched attn1 forwards. The clone is unloaded at the end (every patch undone): MODEL is
unchanged afterwards.

The start latent is the inversion's latent at the first sigma (the input latent only fixes the size; use
DisableNoise). Sigmas: the inversion's schedule, e.g. KarrasScheduler(inversion steps, 700, 0.002).
"""

import math
from dataclasses import dataclass, field

import torch
from comfy_api.latest import io

from i2vedit_core.attention import AttentionController, MatchSettings
from i2vedit_core.backends.comfy_attention import CONTROLLER_KEY

from .artifacts import InvertedVideo, move_inversion
from .host import cancel_check, comfy_backend
from .propagate import edit_settings, matching_inputs
from .types import CATEGORY, Inversion, model_inputs

CHUNK_ROLE = {0: "cond", 1: "uncond"}  # ComfyUI's cond_or_uncond entries
SIGMA_TOLERANCE = 0.02                 # |log sigma - log stored sigma| allowed between schedule and inversion


@dataclass(frozen=True)
class MatchedJob:
    """What the sampler function needs besides the k-diffusion arguments (KSAMPLER extra_options)."""
    model: object
    clip_vision: object
    vae: object
    inverted: InvertedVideo
    matching: MatchSettings
    runs: list = field(default_factory=list, compare=False)


def edit_rows(cond_or_uncond) -> tuple:
    try:
        return tuple(CHUNK_ROLE[int(c)] for c in cond_or_uncond)
    except KeyError as error:
        raise ValueError(f"I2VEdit Matched Sampler: cond_or_uncond {list(cond_or_uncond)} has entries other than "
                         "positive (0) and negative (1); use CFGGuider or BasicGuider") from error


def edit_wrapper(controller: AttentionController, previous=None):
    """A `model_function_wrapper` that gives each UNet call an edit pass with that call's rows."""
    def wrapper(apply_model, args):
        c = dict(args["c"])
        options = dict(c.get("transformer_options", {}))
        options[CONTROLLER_KEY] = controller.edit_pass(edit_rows(args["cond_or_uncond"]))
        c["transformer_options"] = options
        args = dict(args, c=c)
        if previous is not None:
            return previous(apply_model, args)
        return apply_model(args["input"], args["timestep"], **c)
    return wrapper


def stored_index(inversion, sigma: float) -> int:
    distance = (inversion.sigmas.double().log() - math.log(sigma)).abs()
    index = int(distance.argmin())
    if float(distance[index]) > SIGMA_TOLERANCE:
        stored = ", ".join(f"{float(s):.4g}" for s in inversion.sigmas.flip(0)[:-1])
        raise ValueError(f"I2VEdit Matched Sampler: sigma {sigma:.4g} is not one of the inversion's sigmas ({stored}): "
                         f"use KarrasScheduler with the inversion's steps ({len(inversion.sigmas) - 1}), sigma_max "
                         "700, sigma_min 0.002, rho 7 (denoise 1.0)")
    return index


@torch.no_grad()
def matched_function(model, x, sigmas, extra_args=None, callback=None, disable=None, job: MatchedJob = None):
    """k-diffusion sampler contract (COMFYUI_NOTES 4.3): matched deterministic Euler down `sigmas`."""
    if job is None:
        raise ValueError("I2VEdit Matched Sampler: missing its job (build it with the I2VEdit Matched Sampler node)")
    if len(sigmas) < 2 or not bool((sigmas[1:] < sigmas[:-1]).all()) or float(sigmas[-2]) <= 0:
        raise ValueError("I2VEdit Matched Sampler needs descending sigmas (a scheduler without FlipSigmas)")
    guider_patcher = getattr(getattr(model, "inner_model", None), "model_patcher", None)
    if guider_patcher is not None and guider_patcher.model is not job.model.model:
        raise ValueError("I2VEdit Matched Sampler: the guider samples a different MODEL than the one connected to the "
                         "sampler: connect the same SVD MODEL to both (attention control patches that model)")
    extra_args = dict(extra_args or {})
    inversion = job.inverted.inversions[0]
    frames, latent_shape = inversion.latents.shape[2], tuple(inversion.latents.shape[3:])
    if x.shape[0] != frames or tuple(x.shape[1:]) != latent_shape:
        raise ValueError(f"I2VEdit Matched Sampler: the latent is {tuple(x.shape)}, the inversion's clip 0 is "
                         f"{frames} frames of {latent_shape}: give SamplerCustomAdvanced a latent of clip 0's size "
                         "(SVD_img2vid_Conditioning with the clip's frame count and working size)")
    steps = len(sigmas) - 1
    controller = AttentionController(job.matching, steps)
    options = dict(extra_args.get("model_options", {}))
    options["model_function_wrapper"] = edit_wrapper(controller, options.get("model_function_wrapper"))
    extra_args["model_options"] = options
    matching = job.matching.match_spatial or job.matching.match_temporal
    cancel = cancel_check()
    s_in = x.new_ones([x.shape[0]])
    dtype = x.dtype
    with comfy_backend(job.model, job.clip_vision, job.vae) as backend:
        if backend.identity() != job.inverted.model_identity:
            raise ValueError("the inversion was made with a different MODEL: connect the same SVD model to "
                             "I2VEdit Invert and I2VEdit Matched Sampler")
        source = move_inversion(inversion, backend.device)
        x = source.latents[stored_index(source, float(sigmas[0]))][0].to(x)
        try:
            for i in range(steps):
                cancel()
                sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
                controller.begin_step(i)
                if matching:
                    index = stored_index(source, sigma)
                    backend.denoise(source.latents[index], float(source.sigmas[index]), source.cond,
                                    attention=controller.source_pass(), lora_scale=0.0)
                backend.load()  # the attn1 patches must be the ones in place for the guider's call
                denoised = model(x, sigmas[i] * s_in, **extra_args)
                controller.release()
                if callback is not None:
                    callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
                x = x + (x - denoised) / sigma * (sigma_next - sigma)
        finally:
            controller.end()
    job.runs[:] = [controller]  # the last run's controller: difference maps (controller.maps) for inspection
    return x.to(dtype)


class MatchedSamplerNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        widgets = [w for w in matching_inputs() if w.id not in ("min_guidance", "max_guidance")]
        return io.Schema(
            node_id="I2VEditMatchedSampler", display_name="I2VEdit Matched Sampler", category=CATEGORY + "/sampling",
            description="A SAMPLER for SamplerCustomAdvanced that propagates an edited first frame with I2VEdit's "
                        "matched denoising: every step recomputes the source's attention from the inversion (clip 0) "
                        "and copies it where the edit did not change the picture. Give it DisableNoise, a guider on "
                        "the edited frame (SVD_img2vid_Conditioning + CFGGuider) and KarrasScheduler with the "
                        "inversion's steps.",
            inputs=model_inputs() + [Inversion.Input("inversion", tooltip="From I2VEdit Invert (same MODEL); clip 0 "
                                                                          "is used.")] + widgets,
            outputs=[io.Sampler.Output(display_name="sampler")])

    @classmethod
    def execute(cls, model, clip_vision, vae, inversion, **widgets) -> io.NodeOutput:
        import comfy.samplers

        matching = edit_settings(min_guidance=1.0, max_guidance=1.0, random_seed=0, **widgets).matching
        job = MatchedJob(model, clip_vision, vae, inversion, matching)
        return io.NodeOutput(comfy.samplers.KSAMPLER(matched_function, extra_options={"job": job}))


__all__ = ["MatchedSamplerNode", "matched_function", "edit_wrapper"]
