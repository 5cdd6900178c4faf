"""EDM noise schedule for SVD: Karras sigmas, inversion sigmas, v-prediction preconditioning.

All values are float64 on the CPU: they are a handful of scalars, and the inversion's
extrapolated sigma (~5e-4) loses digits in float32 through sigma**2.
"""

import math
from dataclasses import dataclass

import torch

SIGMA_MIN = 0.002
SIGMA_MAX = 700.0
RHO = 7.0


def karras_sigmas(steps: int = 25, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
                  rho: float = RHO) -> torch.Tensor:
    """The `steps` Karras sigmas from sigma_max down to sigma_min (no trailing zero)."""
    if steps < 2:
        raise ValueError(f"steps must be at least 2, got {steps}")
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def denoising_sigmas(steps: int = 25, **kwargs) -> torch.Tensor:
    """Descending sigmas for sampling: Karras sigmas then 0 (steps + 1 values)."""
    return torch.cat([karras_sigmas(steps, **kwargs), torch.zeros(1, dtype=torch.float64)])


def extrapolated_sigma0(sigmas: torch.Tensor) -> float:
    """The sigma below sigma_min used to start inversion: sigma_last**2 / sigma_second_last.

    Inversion evaluates the derivative at the lower sigma and divides by it, so it cannot
    start from 0; this continues the geometric tail of the schedule one step.
    """
    return float(sigmas[-1] ** 2 / sigmas[-2])


def inversion_sigmas(steps: int = 25, **kwargs) -> torch.Tensor:
    """Ascending sigmas for inversion: extrapolated sigma0, then sigma_min ... sigma_max."""
    sigmas = karras_sigmas(steps, **kwargs)
    start = torch.tensor([extrapolated_sigma0(sigmas)], dtype=torch.float64)
    return torch.cat([start, sigmas.flip(0)])


@dataclass(frozen=True)
class Preconditioning:
    c_in: float
    c_skip: float
    c_out: float
    c_noise: float


def edm_v_preconditioning(sigma) -> Preconditioning:
    """EDM preconditioning for a v-prediction network with sigma_data = 1. sigma: a number, or a 0-d tensor (a
    captured training step's, training_graph.py), which gives tensors computed on its device."""
    if isinstance(sigma, torch.Tensor):
        norm = sigma * sigma + 1.0
        return Preconditioning(c_in=norm.rsqrt(), c_skip=1.0 / norm, c_out=-sigma * norm.rsqrt(),
                               c_noise=0.25 * sigma.log())
    sigma = float(sigma)
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0 for the denoiser, got {sigma}")
    norm = sigma * sigma + 1.0
    return Preconditioning(c_in=1.0 / math.sqrt(norm), c_skip=1.0 / norm,
                           c_out=-sigma / math.sqrt(norm), c_noise=0.25 * math.log(sigma))


def euler_step(x: torch.Tensor, denoised: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """One Euler step of the probability-flow ODE from sigma to sigma_next (either direction)."""
    derivative = (x - denoised) / float(sigma)
    return x + (float(sigma_next) - float(sigma)) * derivative


def nearest_sigma_index(sigmas: torch.Tensor, sigma: float) -> int:
    """Index of the entry of `sigmas` (all > 0) nearest to `sigma` in log space."""
    return int((sigmas.log() - math.log(float(sigma))).abs().argmin())
