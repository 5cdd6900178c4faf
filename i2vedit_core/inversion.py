"""EDM inversion of a source clip (ALGORITHM.md sections 2-3): SARP, encode, run the ODE upward."""

import math
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from .skip import KVSource, SkipInterval
from .backends.base import Conditioning, SVDBackend
from .conditioning import MicroConditioning, frame_conditioning, official_inversion_conditioning
from .frames import as_frame_batch
from .sampling import StepCallback, invert
from .sarp import SARP_ALPHA, SARP_THRESHOLD, perturb_smooth_areas
from .schedule import inversion_sigmas, nearest_sigma_index


@dataclass(frozen=True)
class InversionSettings:
    steps: int = 25
    sarp_alpha: float = SARP_ALPHA
    sarp_threshold: float = SARP_THRESHOLD
    # The official code conditions inversion on fps id 8 (it skips SVD's fps - 1).
    micro: MicroConditioning = field(default_factory=lambda: MicroConditioning(fps_id=8))
    seed: int = 0
    # The official code's choices (docs/FIDELITY.md says why the defaults differ):
    cond_8bit: bool = False   # conditioning from two SARP'd copies of frame 0 after a uint8 round trip
    vae_sample: bool = False  # start latent drawn from the VAE posterior (seeded) instead of its mode

    def __post_init__(self):
        # Checked here, not deep in the sampler: 0 steps would give an empty schedule and a confusing crash.
        if not (isinstance(self.steps, int) and self.steps >= 1):
            raise ValueError(f"inversion steps must be a positive integer (paper: 25), got {self.steps!r}")
        if not (math.isfinite(self.sarp_alpha) and self.sarp_alpha >= 0):
            raise ValueError(f"sarp_alpha must be a finite value >= 0 (0 = SARP off, paper: {SARP_ALPHA}), "
                             f"got {self.sarp_alpha}")
        if not (math.isfinite(self.sarp_threshold) and self.sarp_threshold >= 0):
            raise ValueError(f"sarp_threshold must be a finite value >= 0 (paper: {SARP_THRESHOLD}), "
                             f"got {self.sarp_threshold}")


@dataclass
class Inversion:
    """The inversion of one clip: everything later stages need from it.

    sigmas: ascending (steps + 1,), float64. latents: (steps + 1, 1, F, 4, h, w) float32, the latent
    at each sigma; latents[-1] is the starting noise for editing. cond: the source conditioning.
    """
    sigmas: torch.Tensor
    latents: torch.Tensor
    cond: Conditioning

    def latent_at(self, sigma: float) -> torch.Tensor:
        """The stored latent whose sigma is nearest to `sigma` (in log space)."""
        return self.latents[nearest_sigma_index(self.sigmas, sigma)]

    @property
    def noise(self) -> torch.Tensor:
        return self.latents[-1]


def invert_clip(backend: SVDBackend, frames: torch.Tensor, settings: InversionSettings = InversionSettings(),
                callback: Optional[StepCallback] = None, clip0: Optional["Inversion"] = None) -> Inversion:
    """SARP -> VAE encode -> 'steps' upward Euler steps of the base model (no CFG, no LoRA).

    clip0: the inversion of source clip 0, for a clip >= 1 with skip-interval attention (ALGORITHM §6):
    every temporal attn1 also attends to clip 0's K/V, recomputed from its latent at the same sigma.
    """
    frames = as_frame_batch(frames, "source clip", min_frames=2).to(backend.device)
    generator = torch.Generator().manual_seed(settings.seed)  # CPU, as ComfyUI: a seed means the same on any device
    # One SARP draw covers the clip and its conditioning copies of frame 0, as in the official code;
    # draws in its order: SARP, VAE posterior, conditioning noise.
    copies = 2 if settings.cond_8bit else 1
    perturbed = perturb_smooth_areas(torch.cat([frames[:1]] * copies + [frames]), settings.sarp_alpha,
                                     settings.sarp_threshold, generator)
    clip = perturbed[copies:]
    x0 = (backend.encode(clip, generator=generator) if settings.vae_sample else backend.encode(clip))[None]
    if settings.cond_8bit:
        cond = official_inversion_conditioning(backend, perturbed[0], perturbed[1], len(clip), settings.micro,
                                               generator)
    else:
        cond = frame_conditioning(backend, perturbed[0], len(clip), settings.micro, generator)
    sigmas = inversion_sigmas(settings.steps)
    if clip0 is None:
        # lora_scale=0: inversion is of the base model, even while a clip's motion LoRA is attached
        model = lambda x, sigma, step: backend.denoise(x, sigma, cond, lora_scale=0.0)
    else:
        skip = SkipInterval(backend, KVSource.from_inversion(clip0))
        model = lambda x, sigma, step: skip.denoise(x, sigma, cond, lora_scale=0.0, rows=("source",))
    latents = invert(model, x0, sigmas, callback=callback)
    return Inversion(sigmas, latents, cond)


def invert_clips(backend: SVDBackend, clips: List[torch.Tensor], settings: InversionSettings = InversionSettings(),
                 callback: Optional[StepCallback] = None) -> List[Inversion]:
    if len(clips) == 0:
        raise ValueError("no clips to invert: split the video with clips.split_clips first (it needs >= 2 frames)")
    return [invert_clip(backend, clip, settings, callback) for clip in clips]
