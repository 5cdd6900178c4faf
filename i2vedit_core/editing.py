"""Matched denoising of one clip (ALGORITHM §5): the edit steered by recomputed source attention.

Each of the `steps` Euler steps runs, in one controller step:
  [clip-0 K/V forwards when skip-interval is on (ALGORITHM §6): source clip 0 on the base model
   for the source forward; edited clip 0 exactly as its own edit ran (`EditedClip0`) for the edit]
  a base-model forward (LoRA off) on the source inversion latent at the matching sigma with the
  source conditioning, capturing spatial q/k and temporal probabilities;
  the edit forward with CFG, batch [uncond, cond], consuming them on the cond rows only.
Nothing is stored across steps but the difference maps and the (small) latent trajectory.
"""

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from .attention import AttentionController, DifferenceMaps, MatchSettings
from .attention.controller import CFG_ROWS
from .backends.base import Conditioning, SVDBackend
from .conditioning import with_latent_noise
from .inversion import Inversion
from .sampling import StepCallback, sample_matched
from .schedule import nearest_sigma_index
from .skip import KVSource

SIGMA_TOLERANCE = 0.02  # |log sigma - log inversion sigma| allowed between a host's schedule and the inversion


@dataclass(frozen=True)
class EditSettings:
    matching: MatchSettings = field(default_factory=MatchSettings)
    min_guidance: float = 1.0      # CFG scale of frame 0, linear to max_guidance at the last frame
    max_guidance: float = 2.5
    cond_latent_noise: float = 0.02
    source_step_offset: int = 0    # 1 = the official code's source sigma, one step lower
    seed: int = 0

    def __post_init__(self):
        # CFG below 1 pushes away from the edited frame, NaN poisons every latent: refuse both up front.
        for name in ("min_guidance", "max_guidance"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 1.0):
                raise ValueError(f"{name} must be a finite CFG scale >= 1 (SVD: min 1.0, max 2.5-3.0), got {value}")
        if not (math.isfinite(self.cond_latent_noise) and self.cond_latent_noise >= 0):
            raise ValueError(f"cond_latent_noise must be a finite value >= 0 (official: 0.02), "
                             f"got {self.cond_latent_noise}")
        if self.source_step_offset not in (0, 1):
            raise ValueError(f"source_step_offset must be 0 or 1 (official), got {self.source_step_offset}")


@dataclass
class EditResult:
    """latent: (1, F, 4, h, w) final edit. sigmas: the descending sigmas (steps + 1). latents: (steps, 1, F,
    4, h, w), the latent entering each step. cond: the CFG conditioning used, rows [uncond, cond].
    maps: difference maps M (`maps.per_layer()`, `maps.average()`: (1, F, h, w), mean over steps).
    settings, lora_scale: what the edit ran with (a later clip recomputes its K/V with them)."""
    latent: torch.Tensor
    sigmas: torch.Tensor
    latents: torch.Tensor
    cond: Conditioning
    maps: DifferenceMaps
    settings: EditSettings = EditSettings()
    lora_scale: float = 0.0

    def latent_at(self, sigma: float) -> torch.Tensor:
        return self.latents[nearest_sigma_index(self.sigmas[:-1], sigma)]


@dataclass(frozen=True)
class EditedClip0:
    """Edited clip 0 as the K/V source of a later clip's edit, as the official code made those K/V: the
    forward of clip 0's own edit at the same step (its latent entering that step, both CFG rows, its
    LoRA at its scale from the backend's "clip0" slot, its attention matched against source clip 0)
    recomputed, never stored. Costs one source forward (batch 1) and one edit forward (batch 2) a step.
    """
    inversion: Inversion     # of source clip 0
    edit: EditResult         # clip 0's edit
    lora_slot: str = "clip0"

    def capture(self, backend: SVDBackend, controller: AttentionController, sigma: float, step: int) -> None:
        settings, steps = self.edit.settings, len(self.edit.latents)
        if abs(float(self.edit.sigmas[step]) - sigma) > 1e-6 * max(sigma, 1.0):
            raise ValueError(f"clip 0 was edited with other sigmas ({float(self.edit.sigmas[step])} at step {step}, "
                             f"this clip {sigma}): edit every clip with the same steps")
        own = AttentionController(settings.matching, steps)
        own.begin_step(step)
        try:
            source_forward(backend, own, self.inversion, steps - step - settings.source_step_offset, None)
            x = self.edit.latents[step]
            with torch.no_grad():
                backend.denoise(torch.cat([x, x]), sigma, self.edit.cond,
                                attention=own.edit_pass(CFG_ROWS, kv_into=controller),
                                lora_scale=self.edit.lora_scale, lora_slot=self.lora_slot)
        finally:
            own.end()


@dataclass(frozen=True)
class Clip0:
    """Skip-interval inputs of a clip >= 1: K/V sources of source clip 0 and of edited clip 0."""
    source: KVSource
    edit: EditedClip0

    @staticmethod
    def of(inversion: Inversion, edit: EditResult) -> "Clip0":
        """inversion, edit: of clip 0. If clip 0 was edited with a LoRA, the backend must hold it in its
        "clip0" slot (`backend.load_lora(lora_of_clip_0, slot="clip0")`) while later clips are edited."""
        return Clip0(KVSource.from_inversion(inversion), EditedClip0(inversion, edit))


def edit_clip(backend: SVDBackend, inversion: Inversion, edit_cond: Conditioning,
              settings: EditSettings = EditSettings(), lora_scale: float = 1.0,
              callback: Optional[StepCallback] = None, clip0: Optional[Clip0] = None,
              mask: Optional[torch.Tensor] = None) -> EditResult:
    """Denoise `inversion.noise` under `edit_cond` (batch 1, clean conditioning latent) with matching.

    The callback dict also has "masks" (spatial layer path -> M (1, F, N) of that step) and
    "temporal_source" (temporal layer paths that used the source probabilities).
    mask: optional (h, w) latent-resolution edit mask in [0, 1]. Before every step the latent becomes
    m * x + (1 - m) * (source inversion latent at that sigma), and the final latent
    m * x + (1 - m) * (source latent): where m = 0 the output is the source, where m = 1 the edit
    is untouched (an all-one mask gives exactly the unmasked result).
    """
    if edit_cond.batch_size != 1 or edit_cond.image_latents.shape[1] != inversion.latents.shape[2]:
        raise ValueError("edit conditioning must be one video with the clip's frame count "
                         "(conditioning.latent_conditioning(embeds, latent, num_frames))")
    steps = len(inversion.sigmas) - 1
    controller = AttentionController(settings.matching, steps, skip_interval=clip0 is not None)
    cfg_cond = Conditioning.cat(edit_cond.zeros_like(), noised_conditioning(edit_cond, settings))
    frames = edit_cond.image_latents.shape[1]
    # Computed on the CPU as always, moved once: a copy from pageable memory at every step made the host wait for
    # the GPU's whole queue (the source forward) before it could queue the CFG pair.
    guidance = torch.linspace(settings.min_guidance, settings.max_guidance, frames).view(1, frames, 1, 1, 1)
    guidance = guidance.to(inversion.noise.device)
    trajectory = []

    keep = None if mask is None else mask.to(inversion.latents).view(1, 1, 1, *mask.shape[-2:])

    def before_step(step, sigma):
        controller.begin_step(step)
        source_forward(backend, controller, inversion, steps - step - settings.source_step_offset, clip0)
        if clip0 is not None:
            clip0.edit.capture(backend, controller, sigma, step)

    def model(x, sigma):
        trajectory.append(x)
        denoised = backend.denoise(torch.cat([x, x]), sigma, cfg_cond, attention=controller.edit_pass(CFG_ROWS),
                                   lora_scale=lora_scale)
        controller.release()
        uncond, cond_ = denoised.chunk(2)
        return uncond + guidance.to(uncond) * (cond_ - uncond)

    def report(info):
        if callback is not None:
            callback(dict(info, masks=dict(controller.buffer.masks),
                          temporal_source=set(controller.buffer.temporal_source)))

    sigmas = edit_sigmas(inversion)
    try:
        latent = sample_matched(model, inversion.noise, sigmas, callback=report, before_step=before_step, keep=keep,
                                source=None if keep is None else lambda i: inversion.latents[steps - i])
    finally:
        controller.end()
    return EditResult(latent, sigmas, torch.stack(trajectory), cfg_cond, controller.maps, settings, lora_scale)


def edit_sigmas(inversion: Inversion) -> torch.Tensor:
    """The inversion's sigmas descending, then 0: step i starts at inversion.latents[steps - i]'s sigma."""
    return torch.cat([inversion.sigmas[1:].flip(0), torch.zeros(1, dtype=inversion.sigmas.dtype)])


def check_schedule(inversion: Inversion, sigmas: torch.Tensor) -> torch.Tensor:
    """A host's descending schedule checked against the inversion's; returns `edit_sigmas(inversion)`, so that
    step i is exactly the inversion's step (no nearest-sigma search per step)."""
    expected = edit_sigmas(inversion)
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64).flatten().cpu()
    if len(sigmas) == len(expected) and float(sigmas[-1]) == 0 and bool((sigmas[:-1] > 0).all()):
        if float((sigmas[:-1].log() - expected[:-1].log()).abs().max()) <= SIGMA_TOLERANCE:
            return expected
    stored = ", ".join(f"{float(s):.4g}" for s in expected[:-1])
    raise ValueError(f"the schedule ({', '.join(f'{float(s):.4g}' for s in sigmas)}) is not the inversion's ({stored}, "
                     f"0): use KarrasScheduler with the inversion's steps ({len(expected) - 1}), sigma_max 700, "
                     "sigma_min 0.002, rho 7, denoise 1.0, and no FlipSigmas")


def noised_conditioning(edit_cond: Conditioning, settings: EditSettings) -> Conditioning:
    """The conditional branch's conditioning: the clean latent plus settings.cond_latent_noise of noise drawn
    from settings.seed (what edit_clip and the I2VEdit Edit Conditioning node give the UNet)."""
    generator = torch.Generator().manual_seed(settings.seed)  # CPU, as ComfyUI: a seed means the same on any device
    return with_latent_noise(edit_cond, settings.cond_latent_noise, generator)


def source_forward(backend, controller: AttentionController, inversion: Inversion, index: int,
                   clip0: Optional[Clip0]) -> None:
    """Base model on the stored source latent inversion.latents[index] at its own sigma (capture)."""
    matching = controller.settings
    if not (matching.match_spatial or matching.match_temporal):
        return
    sigma = float(inversion.sigmas[index])
    if clip0 is not None:
        clip0.source.capture(backend, controller, sigma)
    with torch.no_grad():
        backend.denoise(inversion.latents[index], sigma, inversion.cond, attention=controller.source_pass(),
                        lora_scale=0.0)
