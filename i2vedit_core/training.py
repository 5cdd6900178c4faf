"""Motion-LoRA training on one source clip (ALGORITHM.md section 4; OFFICIAL_CODE_NOTES 5).

Per step: sigma from the official code's cosine-interpolated distribution (or SVD's lognormal),
z = z0 + sigma * eps, conditioning latent = source frame-0 latent + 0.02 latent noise, CLIP of
source frame 0, loss = mean((1 + sigma^2) / sigma^2 * (D(z, sigma) - z0)^2) over all frames,
AdamW on the LoRA only. Everything random comes from one seed.
"""

import contextlib
import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from .backends.base import Conditioning
from .conditioning import MicroConditioning, host_randn, latent_conditioning, with_latent_noise
from .frames import SIZE_MULTIPLE, as_frame_batch
from .lora import LoraSpec, MotionLora, clip_fingerprint
from .memory import checkpoint_setting
from .schedule import SIGMA_MAX, SIGMA_MIN
from .training_graph import CapturedStep, graph_applies

ProgressCallback = Callable[[dict], None]


class TrainingCancelled(RuntimeError):
    """Raised when the host's cancel check returns true; the backend is left without the adapter."""


@dataclass(frozen=True)
class TrainingSettings:
    steps: int = 250
    learning_rate: float = 5e-4
    betas: Tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-2
    sigma_distribution: str = "cosine_interpolated"  # or "lognormal" (SVD's P_mean 0.7, P_std 1.6)
    lognormal_mean: float = 0.7
    lognormal_std: float = 1.6
    cond_noise: float = 0.02  # latent-space noise on the conditioning latent (official code, fixed)
    micro: MicroConditioning = field(default_factory=MicroConditioning)
    max_pixels: int = 512 * 896  # larger clips are downscaled to about this area, aspect kept
    mixed_precision: bool = True  # bf16 autocast on CUDA (LoRA weights stay fp32); fp32 on CPU
    # True: every layer; n: the n finest levels; or (level, kind) pairs, kept as a sorted tuple (memory.py)
    gradient_checkpointing: Union[bool, int, tuple] = False
    # torch.compile of the UNet for the steps: None = the memory plan decides (pipeline), False = off,
    # True = inductor on CUDA (off on the CPU), or a torch.compile backend name used on any device.
    compile: Union[None, bool, str] = None
    # Replay the training step as one CUDA graph where it can be captured (training_graph.graph_applies): on
    # CUDA, a backend that supports it, no skip-interval, not compiled with checkpointing. False: every step
    # queued eagerly.
    cuda_graph: bool = True
    lora: LoraSpec = field(default_factory=LoraSpec)
    seed: int = 0

    def __post_init__(self):
        if not (isinstance(self.steps, int) and self.steps >= 1):
            raise ValueError(f"training steps must be a positive integer (paper: 250; for no motion LoRA "
                             f"pass training=None), got {self.steps!r}")
        object.__setattr__(self, "gradient_checkpointing", checkpoint_setting(self.gradient_checkpointing))
        # NaN fails every comparison below, so it is refused with the same messages.
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning_rate must be a finite value > 0 (paper: 5e-4), got {self.learning_rate}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"AdamW betas must be two values in [0, 1) (default (0.9, 0.999)), got {self.betas}")
        if not self.weight_decay >= 0 or not self.cond_noise >= 0:
            raise ValueError(f"weight_decay and cond_noise must be >= 0, got {self.weight_decay}, {self.cond_noise}")
        if not self.max_pixels >= SIZE_MULTIPLE * SIZE_MULTIPLE:
            raise ValueError(f"max_pixels must be at least {SIZE_MULTIPLE * SIZE_MULTIPLE} (one 64x64 frame), "
                             f"got {self.max_pixels}")
        if not (self.compile is None or isinstance(self.compile, bool) or (isinstance(self.compile, str) and self.compile)):
            raise ValueError(f"compile must be None (the memory plan decides), True, False or a torch.compile "
                             f"backend name such as 'inductor', got {self.compile!r}")
        if self.sigma_distribution not in ("cosine_interpolated", "lognormal"):
            raise ValueError(f"sigma_distribution must be 'cosine_interpolated' or 'lognormal', "
                             f"got {self.sigma_distribution!r}")


@dataclass
class TrainingResult:
    lora: MotionLora
    losses: List[float]
    sigmas: List[float]
    seconds_per_step: float


# --- sigma distributions -----------------------------------------------------------------------

def cosine_interpolated_sigma(u: torch.Tensor, image_d: float = 64.0, noise_d_low: float = 32.0,
                              noise_d_high: float = 64.0, sigma_data: float = 0.5, min_value: float = SIGMA_MIN,
                              max_value: float = SIGMA_MAX) -> torch.Tensor:
    """k-diffusion's `rand_cosine_interpolated` as a function of u ~ U(0, 1), with the official code's
    arguments: the logSNR of simple diffusion's shifted cosine schedule, lerped between the shifts
    for noise resolutions 32 and 64 by u itself."""
    u = u.double()
    logsnr_hi, logsnr_lo = -2 * math.log(min_value / sigma_data), -2 * math.log(max_value / sigma_data)

    def shifted_cosine(noise_d):
        shift = 2 * math.log(noise_d / image_d)
        t_min = math.atan(math.exp(-0.5 * (logsnr_lo - shift)))
        t_max = math.atan(math.exp(-0.5 * (logsnr_hi - shift)))
        return -2 * torch.log(torch.tan(t_min + u * (t_max - t_min))) + shift

    logsnr = torch.lerp(shifted_cosine(noise_d_low), shifted_cosine(noise_d_high), u)
    return sigma_data * torch.exp(-logsnr / 2)


def sample_sigma(settings: TrainingSettings, generator: torch.Generator) -> float:
    if settings.sigma_distribution == "lognormal":
        n = torch.randn((), generator=generator, dtype=torch.float64)
        sigma = math.exp(settings.lognormal_mean + settings.lognormal_std * float(n))
        return min(max(sigma, SIGMA_MIN), SIGMA_MAX)  # the weight (1+s^2)/s^2 explodes below the schedule
    return float(cosine_interpolated_sigma(torch.rand((), generator=generator, dtype=torch.float64)))


def edm_weight(sigma: float) -> float:
    """EDM loss weight for sigma_data = 1: 1 / c_out^2 of the x0 error."""
    return (1.0 + sigma * sigma) / (sigma * sigma)


# --- the loop ----------------------------------------------------------------------------------

def training_size(height: int, width: int, max_pixels: int) -> Tuple[int, int]:
    """Downscale (never up) to about `max_pixels`, aspect kept, sides multiples of 64."""
    scale = min(1.0, math.sqrt(max_pixels / (height * width)))
    def snap(side):
        return max(SIZE_MULTIPLE, int(round(side * scale / SIZE_MULTIPLE)) * SIZE_MULTIPLE)
    return (height, width) if scale == 1.0 else (snap(height), snap(width))


def prepare_training_data(backend, frames: torch.Tensor, settings: TrainingSettings) -> Tuple[torch.Tensor, Conditioning]:
    """Clean latents z0 (1, F, 4, h, w) and the clean conditioning, computed once for all steps."""
    size = training_size(frames.shape[-2], frames.shape[-1], settings.max_pixels)
    if size != tuple(frames.shape[-2:]):
        frames = F.interpolate(frames, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)
    with torch.no_grad():
        z0 = backend.encode(frames.to(backend.device))[None]
        embeds = backend.image_embedding(frames[:1])
    # The conditioning latent is the source frame-0 latent itself (unscaled), as the official code.
    cond = latent_conditioning(embeds, z0[:, 0] / backend.latent_scale, z0.shape[1], settings.micro)
    return z0, cond


def training_step(denoise: Callable[..., torch.Tensor], optimizer: torch.optim.Optimizer, z0: torch.Tensor,
                  cond: Conditioning, sigma: float, settings: TrainingSettings, generator: torch.Generator) -> float:
    """One AdamW step on the EDM-weighted denoising loss at `sigma`; returns the loss.

    denoise(x, sigma, cond, lora_scale=...): `backend.denoise`, or a skip-interval denoiser.
    """
    return float(queue_training_step(denoise, optimizer, z0, cond, sigma, settings, generator))


def queue_training_step(denoise, optimizer, z0, cond, sigma, settings, generator) -> torch.Tensor:
    """`training_step` without waiting for it: the loss stays a tensor on the device (reading it makes the
    host wait for the GPU to finish the step, and the GPU then idles while the host queues the next one)."""
    noise, noisy_cond = draw_step_inputs(z0, cond, settings, generator)
    return step_on(denoise, optimizer, z0, noise, noisy_cond, sigma, edm_weight(sigma), settings.mixed_precision)


def draw_step_inputs(z0: torch.Tensor, cond: Conditioning, settings: TrainingSettings,
                     generator: torch.Generator) -> Tuple[torch.Tensor, Conditioning]:
    """The step's noise on z0 and its conditioning with latent noise, drawn on the host from `generator`."""
    noise = host_randn(z0.shape, generator, z0.device)
    return noise, with_latent_noise(cond, settings.cond_noise, generator)


def step_on(denoise, optimizer, z0, noise, cond, sigma, weight, mixed_precision: bool) -> torch.Tensor:
    """The step's device work, from inputs already drawn: sigma and the EDM weight are numbers, or 0-d device
    tensors where a captured graph replays the step (training_graph.py). Returns the loss, not read."""
    use_bf16 = mixed_precision and z0.device.type == "cuda"
    with torch.enable_grad(), torch.autocast(z0.device.type, dtype=torch.bfloat16, enabled=use_bf16):
        denoised = denoise(z0 + sigma * noise, sigma, cond, lora_scale=1.0)
        loss = weight * (denoised.float() - z0).pow(2).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def train_motion_lora(backend, frames: torch.Tensor, settings: TrainingSettings = TrainingSettings(),
                      progress: Optional[ProgressCallback] = None, cancel: Optional[Callable[[], bool]] = None,
                      clip0=None) -> TrainingResult:
    """Train a fresh motion LoRA on one source clip (T, 3, H, W) in [-1, 1].

    progress: called for every step with {"step", "steps", "loss", "sigma"}, once the next step is queued (the
    last after it: reading the loss waits for the GPU). cancel: checked before
    every step; a true result raises TrainingCancelled (so may an exception from either callable).
    clip0: for clips >= 1 with skip-interval, the Inversion of source clip 0 at the training resolution.
    On success the backend keeps the trained adapter attached; on any error it is detached.
    """
    frames = as_frame_batch(frames, "training clip", min_frames=2)
    denoise = _skip_interval_denoiser(backend, clip0) if clip0 is not None else backend.denoise
    generator = torch.Generator().manual_seed(settings.seed)
    z0, cond = prepare_training_data(backend, frames, settings)
    backend.attach_lora(settings.lora, generator)
    try:
        losses, sigmas, seconds = _run_steps(backend, denoise, z0, cond, settings, generator, progress, cancel)
    except BaseException:
        backend.detach_lora()
        raise
    metadata = {"training": json.dumps(asdict(settings)), "source_fingerprint": clip_fingerprint(frames),
                "source_frames": str(frames.shape[0]), "training_size": json.dumps(list(z0.shape[-2:]))}
    return TrainingResult(backend.export_lora(metadata), losses, sigmas, seconds / settings.steps)


def _skip_interval_denoiser(backend, clip0):
    """Temporal attn1 of every forward also attends to source clip 0, whose K/V are recomputed each step
    by a base-model forward on its inversion latent nearest the sampled sigma (ALGORITHM 6)."""
    if not (hasattr(clip0, "latent_at") and hasattr(clip0, "cond")):
        raise ValueError(f"clip0 must be the Inversion of source clip 0 (inversion.invert_clip), got "
                         f"{type(clip0).__name__}")
    from .skip import KVSource, SkipInterval
    return SkipInterval(backend, KVSource.from_inversion(clip0)).denoise


def compile_backend(setting, device: torch.device) -> Optional[str]:
    """The torch.compile backend training uses, None for eager: True means inductor on CUDA with Triton
    (on the CPU inductor needs a C++ toolchain and saves nothing worth its compile time; without Triton,
    e.g. many Windows installs, it cannot build GPU kernels)."""
    if isinstance(setting, str):
        return setting
    return "inductor" if setting and device.type == "cuda" and _triton_runs_on(device) else None


def _triton_runs_on(device: torch.device) -> bool:
    """Triton installed and the GPU new enough for its kernels (compute capability 7.0)."""
    try:
        from torch.utils._triton import has_triton_package
    except ImportError:
        return False
    return bool(has_triton_package()) and torch.cuda.get_device_capability(device) >= (7, 0)


def compiled_unet(backend, compile_with: Optional[str]):
    """The backend's UNet compiled with `compile_with` for the block (its optional `compiled` hook; eager
    without the hook or with None)."""
    hook = getattr(backend, "compiled", None)
    if compile_with is None or hook is None:
        return contextlib.nullcontext()
    return hook(compile_with)


def _run_steps(backend, denoise, z0, cond, settings, generator, progress, cancel):
    device = z0.device
    compile_with = compile_backend(settings.compile, device)
    graphed = graph_applies(settings.cuda_graph, backend, device, settings.gradient_checkpointing,
                            denoise != backend.denoise, compile_with)
    optimizer = torch.optim.AdamW(backend.lora_parameters(), lr=settings.learning_rate, betas=settings.betas,
                                  eps=1e-8, weight_decay=settings.weight_decay, capturable=graphed)
    losses, sigmas = [], []
    start = time.perf_counter()
    # LoRA dropout draws from the global RNG: seed a forked copy so training is reproducible and
    # leaves the caller's RNG state as it was.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
            backend.lora_training(settings.gradient_checkpointing), contextlib.ExitStack() as speedups:
        speedups.enter_context(compiled_unet(backend, compile_with))
        torch.manual_seed(settings.seed)
        run_step = lambda *inputs: step_on(denoise, optimizer, z0, *inputs, settings.mixed_precision)  # noqa: E731
        if graphed:
            run_step = CapturedStep(run_step, z0, cond, optimizer)
            speedups.callback(run_step.release)

        def one_step():
            sigma = sample_sigma(settings, generator)
            return sigma, run_step(*draw_step_inputs(z0, cond, settings, generator), sigma, edm_weight(sigma))

        def report(step, sigma, loss):
            losses.append(float(loss))
            sigmas.append(sigma)
            if progress is not None:
                progress({"step": step, "steps": settings.steps, "loss": losses[-1], "sigma": sigma})

        queued = None  # the step before: its loss is read once the next step is queued, so the GPU never idles
        for step in range(settings.steps):
            if cancel is not None and cancel():
                raise TrainingCancelled(f"motion LoRA training cancelled at step {step} of {settings.steps}")
            if step == 0 and compile_with is not None:
                sigma, loss = _first_step_or_eager(one_step, speedups, compile_with, optimizer, generator,
                                                   settings.seed)
            else:
                sigma, loss = one_step()
            if queued is not None:
                report(*queued)
            queued = (step, sigma, loss)
        report(*queued)
    return losses, sigmas, time.perf_counter() - start


def _first_step_or_eager(one_step, compiling, compile_with, optimizer, generator, seed):
    """The first step, where torch.compile builds its graphs. If the compiler fails (no working Triton or
    C++ toolchain, an unsupported op), training goes on eagerly from the same random state, with a warning:
    compiling is a speed-up, never a reason to lose the run. The backward is compiled with the forward here
    (not lazily at the first backward), so that its failures are caught too."""
    from torch._dynamo.exc import BackendCompilerFailed

    generator_state = generator.get_state()
    try:
        with _backward_compiled_with_forward():
            return one_step()
    except BackendCompilerFailed as error:
        cause = getattr(error, "inner_exception", None) or error
        warnings.warn(f"torch.compile ({compile_with}) failed, so motion-LoRA training runs eagerly (slower, "
                      f"same result): {type(cause).__name__}: {str(cause).splitlines()[0][:300]}. Turn compiling "
                      f"off to skip the attempt (TrainingSettings(compile=False), the CLI's --no-compile-training).",
                      stacklevel=4)
    optimizer.zero_grad(set_to_none=True)
    compiling.close()
    generator.set_state(generator_state)
    torch.manual_seed(seed)  # the global RNG (LoRA dropout) as training seeded it before the first step
    try:
        return one_step()
    except BackendCompilerFailed as error:
        raise RuntimeError("torch.compile failed, and the model compiles itself (e.g. ComfyUI's TorchCompileModel "
                           "node before this one): remove that node, or fix the compiler setup "
                           f"({str(error).splitlines()[0][:200]})") from error


def _backward_compiled_with_forward():
    import torch._functorch.config as functorch_config

    if not hasattr(functorch_config, "force_non_lazy_backward_lowering"):
        return contextlib.nullcontext()
    return functorch_config.patch(force_non_lazy_backward_lowering=True)
