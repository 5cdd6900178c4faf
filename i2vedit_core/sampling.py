"""Inversion and denoising loops, shaped like k-diffusion's samplers.

`model(x, sigma, **extra_args)` is a denoiser: it returns D(x, sigma), the model's estimate
of the clean latent. Latents and the Euler update stay float32 whatever the model runs in (float64 stays
float64: `backends.base.state_float`).
`callback`, if given, is called once per step with a dict; raising from it cancels the loop
(ComfyUI's progress callback raises on Cancel the same way). Both loops pass `step=i` to the
model so step-dependent attention control never has to count calls.
"""

from typing import Callable, Optional

import torch

from .backends.base import state_float
from .schedule import euler_step

Denoiser = Callable[..., torch.Tensor]
StepCallback = Callable[[dict], None]


@torch.no_grad()
def invert(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: Optional[dict] = None,
           callback: Optional[StepCallback] = None) -> torch.Tensor:
    """Run the ODE upward from a clean latent along ascending `sigmas`.

    `x` is treated as the latent at sigmas[0] (> 0). Returns a tensor of shape
    (len(sigmas), *x.shape): the latent at every sigma, index i at sigmas[i]; the last entry
    is the inverted noise latent at sigma_max.
    """
    _check_sigmas(sigmas, ascending=True)
    extra_args = extra_args or {}
    x = state_float(x)
    trajectory = [x]
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = model(x, sigma, step=i, **extra_args).to(x.dtype)
        x = euler_step(x, denoised, sigma, sigma_next)
        trajectory.append(x)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_next": sigma_next, "denoised": denoised})
    return torch.stack(trajectory)


@torch.no_grad()
def denoise(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: Optional[dict] = None,
            callback: Optional[StepCallback] = None) -> torch.Tensor:
    """Deterministic Euler sampling along descending `sigmas` (ending at 0). Returns the final latent.

    """
    _check_sigmas(sigmas, ascending=False)
    extra_args = extra_args or {}
    x = state_float(x)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = model(x, sigma, step=i, **extra_args).to(x.dtype)
        x = denoised if sigma_next == 0 else euler_step(x, denoised, sigma, sigma_next)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_next": sigma_next, "denoised": denoised})
    return x


@torch.no_grad()
def sample_matched(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: Optional[dict] = None,
                   callback: Optional[StepCallback] = None, before_step: Optional[Callable[[int, float], None]] = None,
                   keep: Optional[torch.Tensor] = None, source: Optional[Callable[[int], torch.Tensor]] = None
                   ) -> torch.Tensor:
    """Matched denoising (ALGORITHM §5): deterministic Euler down `sigmas` (ending at 0), the one loop of
    editing.edit_clip and the ComfyUI Matched Sampler. Returns the final latent.

    model(x, sigma, **extra_args) -> D(x, sigma), k-diffusion's shape (any CFG is the model's business).
    before_step(i, sigma): runs, before step i's model call, the forwards whose attention it consumes (the
    source forward on the inversion latent, clip-0 K/V).
    keep, source: an optional latent mask (1 = may change, broadcast against x) and source(i), the source
    latent entering step i (source(len(sigmas) - 1): the clean source). Before every step and after the last,
    x = keep * x + (1 - keep) * source(i): outside the mask x stays on the source trajectory.
    """
    _check_sigmas(sigmas, ascending=False)
    if (keep is None) != (source is None):
        raise ValueError("a latent mask needs the source trajectory (source) and vice versa")
    extra_args = extra_args or {}
    x = state_float(x)
    steps = len(sigmas) - 1
    for i in range(steps):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        if keep is not None:
            x = keep * x + (1 - keep) * source(i).to(x)
        if before_step is not None:
            before_step(i, sigma)
        denoised = model(x, sigma, **extra_args).to(x.dtype)
        x = denoised if sigma_next == 0 else euler_step(x, denoised, sigma, sigma_next)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_next": sigma_next, "denoised": denoised})
    if keep is not None:
        x = keep * x + (1 - keep) * source(steps).to(x)
    return x


def _check_sigmas(sigmas: torch.Tensor, ascending: bool) -> None:
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError("sigmas must be a 1-d tensor with at least 2 values")
    steps = sigmas[1:] - sigmas[:-1]
    if ascending and not (bool((steps > 0).all()) and float(sigmas[0]) > 0):
        raise ValueError("inversion needs strictly ascending sigmas starting above 0 "
                         "(use schedule.inversion_sigmas)")
    if not ascending and not bool((steps < 0).all()):
        raise ValueError("denoising needs strictly descending sigmas (use schedule.denoising_sigmas)")
