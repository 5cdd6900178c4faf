"""I2VEdit Matched Sampler and I2VEdit Edit Conditioning: the core's matched denoising (ALGORITHM §5) as a
SAMPLER for SamplerCustomAdvanced, and the guider conditioning that goes with it.

The loop is the core's `sampling.sample_matched`, the one edit_clip runs. Per step:
  1. `before_step`: the base-model forward (LoRA scale 0) on the inversion's source latent with the source
     conditioning, capturing spatial q/k and temporal probabilities (`editing.source_forward`);
  2. the guider's own call (a CFGGuider). This sampling's own model_options copy gets a
     `model_function_wrapper` that gives each UNet call an edit pass whose rows follow that call's
     `cond_or_uncond` and the motion LoRA at scale 1 (both in that call's transformer_options), and a `sampler_post_cfg_function` that applies the
     node's min/max guidance per frame exactly as edit_clip does (the guider's cfg is replaced; with
     `disable_cfg1_optimization` the negative is always computed).
MODEL is cloned by the backend: a motion LoRA loaded onto it (LoraLoaderModelOnly) becomes the clone's
activation-space adapter, so the source forward can run the base model (comfy_model_lora.py). The guider's MODEL
must be the same SVD model; the wrapper loads the backend's clone before each UNet call, so that call runs through
the clone's patches (ComfyUI's model management swaps clones of one BaseModel itself).

The start latent is the inversion's noise (the input latent fixes only the size; use DisableNoise). Sigmas: the
inversion's schedule, KarrasScheduler(inversion steps, 700, 0.002), checked by `editing.check_schedule`.
"""

from dataclasses import dataclass, field
from typing import Optional

import torch
from comfy_api.latest import io

from i2vedit_core.attention import AttentionController
from i2vedit_core.backends.comfy_attention import CONTROLLER_KEY
from i2vedit_core.backends.comfy_lora import with_lora
from i2vedit_core.editing import EditSettings, check_schedule, noised_conditioning, source_forward
from i2vedit_core.pipeline import (PipelineSettings, check_edited_frames, edit_conditioning, latent_mask,
                                   memory_hint, memory_plan)
from i2vedit_core.sampling import sample_matched

from .artifacts import InvertedVideo, move_inversion
from .host import cancel_check, comfy_backend, image_to_frames
from .propagate import edit_settings, matching_inputs
from .types import CATEGORY, Inversion, memory_input, model_inputs, seed_input

CHUNK_ROLE = {0: "cond", 1: "uncond"}  # ComfyUI's cond_or_uncond entries


@dataclass(frozen=True)
class MatchedJob:
    """What the sampler function needs besides the k-diffusion arguments (KSAMPLER extra_options)."""
    model: object
    clip_vision: object
    vae: object
    inverted: InvertedVideo
    edit: EditSettings
    mask: Optional[torch.Tensor] = None   # (h, w) latent mask of clip 0 (pipeline.latent_mask), 1 = may change
    memory: str = "auto"
    runs: list = field(default_factory=list, compare=False)


def edit_rows(cond_or_uncond) -> tuple:
    try:
        return tuple(CHUNK_ROLE[int(c)] for c in cond_or_uncond)
    except KeyError as error:
        raise ValueError(f"I2VEdit Matched Sampler: cond_or_uncond {list(cond_or_uncond)} has entries other than "
                         "positive (0) and negative (1); use CFGGuider or BasicGuider") from error


def edit_wrapper(backend, controller: AttentionController, previous=None):
    """A `model_function_wrapper`: each UNet call of the guider runs through the backend's clone with an edit
    pass of that call's rows and the motion LoRA at scale 1."""
    def wrapper(apply_model, args):
        backend.load()  # the clone's attention and LoRA patches are the ones on the shared modules for this call
        c = dict(args["c"])
        options = dict(c.get("transformer_options", {}))
        options[CONTROLLER_KEY] = controller.edit_pass(edit_rows(args["cond_or_uncond"]))
        c["transformer_options"] = with_lora(options, 1.0 if backend.model_lora is not None else 0.0)
        args = dict(args, c=c)
        if previous is not None:
            return previous(apply_model, args)
        return apply_model(args["input"], args["timestep"], **c)
    return wrapper


def linear_guidance(edit: EditSettings, frames: int):
    """A `sampler_post_cfg_function`: CFG from min_guidance at frame 0 to max_guidance at the last frame, the
    formula of editing.edit_clip (uncond + scale * (cond - uncond) on the denoised predictions)."""
    scale = torch.linspace(edit.min_guidance, edit.max_guidance, frames).view(frames, 1, 1, 1)

    def post_cfg(args):
        uncond = args["uncond_denoised"]
        return uncond + scale.to(uncond) * (args["cond_denoised"] - uncond)
    return post_cfg


@torch.no_grad()
def matched_function(model, x, sigmas, extra_args=None, callback=None, disable=None, job: MatchedJob = None):
    """k-diffusion sampler contract (COMFYUI_NOTES 4.3): the core's matched loop with the guider as denoiser."""
    if job is None:
        raise ValueError("I2VEdit Matched Sampler: missing its job (build it with the I2VEdit Matched Sampler node)")
    guider_patcher = getattr(getattr(model, "inner_model", None), "model_patcher", None)
    if guider_patcher is not None and guider_patcher.model is not job.model.model:
        raise ValueError("I2VEdit Matched Sampler: the guider samples a different MODEL than the one connected to the "
                         "sampler: connect the same SVD MODEL (with its motion LoRA) to both")
    inversion = job.inverted.inversions[0]
    frames, latent_shape = inversion.latents.shape[2], tuple(inversion.latents.shape[3:])
    if x.shape[0] != frames or tuple(x.shape[1:]) != latent_shape:
        raise ValueError(f"I2VEdit Matched Sampler: the latent is {tuple(x.shape)}, the inversion's clip 0 is "
                         f"{frames} frames of {latent_shape}: use the latent of I2VEdit Edit Conditioning")
    run_sigmas = check_schedule(inversion, sigmas)
    steps = len(run_sigmas) - 1
    controller = AttentionController(job.edit.matching, steps)
    options = dict((extra_args or {}).get("model_options", {}))
    options["disable_cfg1_optimization"] = True
    options["sampler_post_cfg_function"] = [linear_guidance(job.edit, frames)] + list(
        options.get("sampler_post_cfg_function", []))
    cancel = cancel_check()
    with comfy_backend(job.model, job.clip_vision, job.vae, lora_from_model=True) as backend, \
            memory_hint("matched sampling", memory_plan(backend, PipelineSettings(memory=job.memory))):
        if backend.identity() != job.inverted.model_identity:
            raise ValueError("the inversion was made with a different MODEL: connect the same SVD model (a motion "
                             "LoRA on it is fine) to I2VEdit Invert and I2VEdit Matched Sampler")
        source = move_inversion(inversion, backend.device)
        options["model_function_wrapper"] = edit_wrapper(backend, controller, options.get("model_function_wrapper"))
        args = dict(extra_args or {}, model_options=options)
        s_in = x.new_ones([x.shape[0]], dtype=torch.float32)

        def before_step(i, sigma):
            cancel()
            controller.begin_step(i)
            source_forward(backend, controller, source, steps - i - job.edit.source_step_offset, None)

        def denoiser(latent, sigma):
            out = model(latent[0].to(x.dtype), s_in * sigma, **args)
            controller.release()
            return out.float()[None]

        def report(info):
            if callback is not None:
                callback({"x": info["x"][0], "i": info["i"], "sigma": run_sigmas[info["i"]],
                          "sigma_hat": run_sigmas[info["i"]], "denoised": info["denoised"][0]})

        keep = None if job.mask is None else job.mask.to(source.latents).view(1, 1, 1, *job.mask.shape[-2:])
        try:
            out = sample_matched(denoiser, source.noise, run_sigmas, callback=report, before_step=before_step,
                                 keep=keep, source=None if keep is None else lambda i: source.latents[steps - i])
        finally:
            controller.end()
    job.runs[:] = [controller]  # the last run's controller: difference maps (controller.maps) for inspection
    return out[0].to(x.device, x.dtype)


class MatchedSamplerNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="I2VEditMatchedSampler", display_name="I2VEdit Matched Sampler", category=CATEGORY + "/sampling",
            description="A SAMPLER for SamplerCustomAdvanced that propagates an edited first frame with I2VEdit's "
                        "matched denoising: every step recomputes the source's attention from the inversion (clip 0) "
                        "and copies it where the edit did not change the picture. Give it DisableNoise, a CFGGuider "
                        "on I2VEdit Edit Conditioning (its cfg is replaced by min/max guidance here), "
                        "KarrasScheduler with the inversion's steps, and the same MODEL with its motion LoRA "
                        "(LoraLoaderModelOnly) here and in the guider.",
            inputs=model_inputs() + [
                Inversion.Input("inversion", tooltip="From I2VEdit Invert (same SVD model); clip 0 is used."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Optional MASK at the video's size (1 = may change): outside it the latents "
                                      "follow the source's trajectory."),
            ] + matching_inputs() + [memory_input()],
            outputs=[io.Sampler.Output(display_name="sampler")])

    @classmethod
    def execute(cls, model, clip_vision, vae, inversion, mask=None, memory="auto", **widgets) -> io.NodeOutput:
        import comfy.samplers

        edit = edit_settings(random_seed=0, **widgets)
        latent = None if mask is None else latent_mask(mask.detach().float().cpu(), inversion.clips.video)
        job = MatchedJob(model, clip_vision, vae, inversion, edit, latent, memory)
        return io.NodeOutput(comfy.samplers.KSAMPLER(matched_function, extra_options={"job": job}))


def guider_conditioning(cond):
    """Core Conditioning (batch 1) -> ComfyUI positive / negative for SVD (the negative is zero, as SVD's CFG)."""
    fps_id, motion, aug = cond.time_ids[0].tolist()
    extra = dict(fps=fps_id + 1, motion_bucket_id=motion, augmentation_level=aug)
    positive = [[cond.image_embeds.cpu(), dict(extra, concat_latent_image=cond.image_latents[0].cpu())]]
    negative = [[torch.zeros_like(cond.image_embeds).cpu(),
                 dict(extra, concat_latent_image=torch.zeros_like(cond.image_latents[0]).cpu())]]
    return positive, negative


class EditConditioningNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="I2VEditEditConditioning", display_name="I2VEdit Edit Conditioning", category=CATEGORY + "/sampling",
            description="SVD conditioning on the edited first frame as I2VEdit Propagate builds it: CLIP of the whole "
                        "frame (core SVD_img2vid_Conditioning centre-crops it), the frame's latent at the working size "
                        "with I2VEdit's conditioning noise, and an empty latent of clip 0's size. For the guider of "
                        "I2VEdit Matched Sampler.",
            inputs=model_inputs() + [
                Inversion.Input("inversion", tooltip="From I2VEdit Invert: the working size and clip 0's frames."),
                io.Image.Input("edited_first_frame", tooltip="Frame 0 edited, at the video's size."),
                seed_input("Seed of the conditioning noise (the same seed as I2VEdit Propagate gives the same edit)."),
            ],
            outputs=[io.Conditioning.Output(display_name="positive"), io.Conditioning.Output(display_name="negative"),
                     io.Latent.Output(display_name="latent")])

    @classmethod
    def execute(cls, model, clip_vision, vae, inversion, edited_first_frame, random_seed) -> io.NodeOutput:
        video = inversion.clips.video
        edited = check_edited_frames(image_to_frames(edited_first_frame[:1], "edited first frame"), video.fit)[0]
        frames = len(video.clips[0])
        with comfy_backend(model, clip_vision, vae) as backend:  # the edit's micro-conditioning, as Propagate's
            cond = edit_conditioning(backend, edited, None, None, frames, inversion.settings.micro)
        cond = noised_conditioning(cond, EditSettings(seed=random_seed))
        height, width = video.fit.working_hw
        latent = {"samples": torch.zeros(frames, 4, height // 8, width // 8)}
        return io.NodeOutput(*guider_conditioning(cond), latent)


__all__ = ["MatchedSamplerNode", "EditConditioningNode", "matched_function", "edit_wrapper", "guider_conditioning"]
