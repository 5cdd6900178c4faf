"""Building SVD conditioning from frames (ALGORITHM.md sections 0, 3 and 5)."""

from dataclasses import dataclass
from typing import Optional

import torch

from .backends.base import Conditioning, SVDBackend, state_float


@dataclass(frozen=True)
class MicroConditioning:
    fps_id: int = 6
    motion_bucket_id: int = 127
    noise_aug_strength: float = 0.02

    def time_ids(self, device) -> torch.Tensor:
        # The order [fps_id, motion_bucket, noise_aug] is what SVD was trained with; the official
        # training code swaps two of them by mistake.
        return torch.tensor([[self.fps_id, self.motion_bucket_id, self.noise_aug_strength]],
                            dtype=torch.float32, device=device)


def frame_conditioning(backend: SVDBackend, frame: torch.Tensor, num_frames: int,
                       micro: MicroConditioning = MicroConditioning(),
                       generator: Optional[torch.Generator] = None) -> Conditioning:
    """Conditioning on one frame (3, H, W) in [-1, 1], as SVD's pipeline builds it (batch 1).

    The conditioning latent is the VAE mode of the frame with `noise_aug_strength` pixel noise,
    unscaled, repeated over the frames.
    """
    embeds = backend.image_embedding(frame[None])
    noise = host_randn(frame.shape, generator, frame.device)
    latent = backend.encode((frame + micro.noise_aug_strength * noise)[None]) / backend.latent_scale
    return latent_conditioning(embeds, latent, num_frames, micro)


def eight_bit(frames: torch.Tensor) -> torch.Tensor:
    """The official code's round trip of its inversion conditioning frames through uint8 images:
    truncation (not rounding) of (x + 1)/2·255, read back as u/255·2 − 1."""
    quantized = ((frames.float() + 1) / 2 * 255).to(torch.uint8)
    return quantized.float() / 255 * 2 - 1


def official_inversion_conditioning(backend: SVDBackend, first: torch.Tensor, key: torch.Tensor, num_frames: int,
                                    micro: MicroConditioning, generator: Optional[torch.Generator] = None
                                    ) -> Conditioning:
    """The official inversion conditioning from two SARP'd copies of frame 0 (3, H, W), both through
    `eight_bit`: CLIP of `first`; conditioning latent of `key` at frame 0 and of `first` at frames
    1.., one shared draw of pixel noise for both (OFFICIAL_CODE_NOTES §3)."""
    first, key = eight_bit(first), eight_bit(key)
    embeds = backend.image_embedding(first[None])
    noise = micro.noise_aug_strength * host_randn(first.shape, generator, first.device)
    latents = backend.encode(torch.stack([first + noise, key + noise])) / backend.latent_scale
    image_latents = torch.cat([latents[1:2, None], latents[0:1, None].expand(-1, num_frames - 1, -1, -1, -1)], dim=1)
    return Conditioning(state_float(embeds[:, None]), state_float(image_latents), micro.time_ids(first.device))


def latent_conditioning(embeds: torch.Tensor, latent: torch.Tensor, num_frames: int,
                        micro: MicroConditioning = MicroConditioning()) -> Conditioning:
    """Conditioning from a CLIP embedding (1, D) and an unscaled latent (1, 4, h, w)."""
    image_latents = latent[:, None].expand(-1, num_frames, -1, -1, -1).contiguous()
    return Conditioning(state_float(embeds[:, None]), state_float(image_latents), micro.time_ids(latent.device))


def with_latent_noise(cond: Conditioning, strength: float, generator: Optional[torch.Generator] = None) -> Conditioning:
    """Add `strength` Gaussian noise in latent space to the conditioning latent (one draw, all frames)."""
    first = cond.image_latents[:, :1]
    noisy = first + strength * host_randn(first.shape, generator, first.device).to(first.dtype)  # scaled in the latent's precision
    return Conditioning(cond.image_embeds, noisy.expand_as(cond.image_latents).contiguous(), cond.time_ids)


def host_randn(shape, generator: Optional[torch.Generator], device) -> torch.Tensor:
    """Drawn on the CPU (a CPU generator, as ComfyUI's), then moved: a seed gives the same noise on any device.

    To a GPU through pinned memory, without blocking: a copy from pageable memory makes the host wait until
    the GPU has finished everything queued before it, a stall at every training or editing step."""
    noise = torch.randn(shape, generator=generator)
    if torch.device(device).type != "cuda":
        return noise.to(device)
    return noise.pin_memory().to(device, non_blocking=True)
