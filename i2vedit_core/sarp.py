"""Smooth-area random perturbation (SARP, paper Eq. 5; ALGORITHM.md section 2).

Perfectly flat image areas invert badly (the VAE latent of a constant region carries no
texture for the ODE to hold on to), so a tiny seeded noise is added there before encoding.
"""

from typing import Optional

import torch
from kornia.filters import filter2d, get_spatial_gradient_kernel2d

SARP_ALPHA = 0.005
SARP_THRESHOLD = 0.001


def gradient_magnitude(frames: torch.Tensor) -> torch.Tensor:
    """|Sobel_x| + |Sobel_y| per channel (unnormalised 3x3 kernels, zero padding), mean over channels.

    frames: (N, C, H, W). Returns (N, 1, H, W).
    """
    kernels = get_spatial_gradient_kernel2d("sobel", 1).to(frames)  # (2, 3, 3): x then y
    gx = filter2d(frames, kernels[0:1], border_type="constant")
    gy = filter2d(frames, kernels[1:2], border_type="constant")
    return (gx.abs() + gy.abs()).mean(dim=1, keepdim=True)


def smooth_area_mask(frames: torch.Tensor, threshold: float = SARP_THRESHOLD) -> torch.Tensor:
    """Boolean (N, 1, H, W) mask of pixels whose gradient magnitude is at most `threshold`."""
    return gradient_magnitude(frames.float()) <= threshold


def perturb_smooth_areas(frames: torch.Tensor, alpha: float = SARP_ALPHA, threshold: float = SARP_THRESHOLD,
                         generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """x <- clamp(x + alpha * eps * M, -1, 1) for frames (N, 3, H, W) in [-1, 1].

    eps ~ N(0, 1) per pixel, channel and frame from `generator` (a CPU generator, as ComfyUI's),
    so the same seed gives the same output. alpha = 0 returns the input unchanged.
    """
    if alpha == 0:
        return frames
    frames32 = frames.float()
    mask = smooth_area_mask(frames32, threshold)
    noise = torch.randn(frames32.shape, generator=generator).to(frames32.device)  # CPU draw: same on any device
    perturbed = (frames32 + alpha * noise * mask).clamp(-1, 1)
    return perturbed.to(frames.dtype)
