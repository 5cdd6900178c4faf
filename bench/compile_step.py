"""The motion-LoRA training step eager against torch.compile, on both backends (full-size random SVD).

    python bench/compile_step.py --backend diffusers comfy --comfyui /path/to/ComfyUI

Per backend, at 14 frames and 512x896 (training's size), through the core's own `training_step` and
`compiled_unet` (what `train_motion_lora` runs: the whole UNet through torch.compile), for each
`--checkpointing` setting (0: the fast tier, 3: the 24gb tier, all: the 12gb tier): the eager step; the
first compiled step (compile cost) and the steady compiled step; the first step after a fresh adapter is
attached (a later clip: what the compile caches save); and the largest difference of losses and LoRA
weights eager vs compiled from the same init and seed (dropout 0, so both draw the same numbers).

`--warm` runs the compiled part again in a second process that shares the first one's inductor cache
folder (TORCHINDUCTOR_CACHE_DIR): the compile a user pays after restarting ComfyUI on the same machine.
`--dtype-lever`: diffusers also times its LoRA branch in the activations' dtype against peft's fp32 branch.
Dropout is 0 in the compile runs (module docstring of `bench`); e2e.py measures the real setting.
"""

import argparse
import dataclasses
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import builders  # noqa: E402
import floors  # noqa: E402
from i2vedit_core.backends.base import Conditioning  # noqa: E402
from i2vedit_core.lora import LoraSpec  # noqa: E402
from i2vedit_core.training import TrainingSettings, compiled_unet, training_step  # noqa: E402


def inputs(backend, frames, hw, context, batch=1):
    device = backend.device
    shape = (batch, frames, 4, hw[0] // 8, hw[1] // 8)
    cond = Conditioning(torch.randn(batch, 1, context, device=device), torch.randn(shape, device=device),
                        torch.tensor([[6.0, 127.0, 0.02]] * batch, device=device))
    return torch.randn(shape, device=device), cond


def run_steps(backend, z0, cond, steps, settings, compile_with, checkpointing=False, seed=0, spec=LoraSpec()):
    """Fresh adapter, `steps` training steps; returns (per-step seconds, losses, LoRA weights, peak GiB)."""
    backend.attach_lora(spec, torch.Generator().manual_seed(seed))
    optimizer = torch.optim.AdamW(backend.lora_parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    times, losses = [], []
    torch.cuda.reset_peak_memory_stats()
    with torch.random.fork_rng(devices=[backend.device]), backend.lora_training(checkpointing), \
            compiled_unet(backend, compile_with):
        torch.manual_seed(seed)
        for step in range(steps):
            floors.sync()
            start = time.perf_counter()
            losses.append(training_step(backend.denoise, optimizer, z0, cond, 0.3 + 0.4 * step, settings, gen))
            floors.sync()
            times.append(time.perf_counter() - start)
    weights = [p.detach().clone() for p in backend.lora_parameters()]
    backend.detach_lora()
    return times, losses, weights, torch.cuda.max_memory_allocated() / 2 ** 30


def median(values):
    return sorted(values)[len(values) // 2]


def bench(name, backend, args, emit):
    """Eager, then compiled, from the same init and seed (dropout 0: both draw the same numbers)."""
    hw, frames, context = (512, 896), 14, 1024
    z0, cond = inputs(backend, frames, hw, context)
    settings, spec, n = TrainingSettings(), LoraSpec(dropout=0.0), args.steps + 2
    for checkpointing in [True if c == "all" else int(c) for c in args.checkpointing]:
        tier = {0: "fast", 3: "24gb", True: "12gb"}.get(checkpointing, str(checkpointing))
        if not args.compiled_only:
            eager_t, la, wa, peak = run_steps(backend, z0, cond, n, settings, None, checkpointing, 3, spec)
            emit(f"{name} {tier}: eager step {median(eager_t[2:]) * 1e3:.0f} ms (peak {peak:.1f} GiB)")
        label = f"{name} {tier}{' (warm cache)' if args.compiled_only else ''}"
        try:
            start = time.perf_counter()
            t, lb, wb, peak = run_steps(backend, z0, cond, n, settings, "inductor", checkpointing, 3, spec)
            emit(f"{label}: compiled first step {t[0]:.1f} s, second {t[1]:.2f} s, steady "
                 f"{median(t[2:]) * 1e3:.0f} ms (peak {peak:.1f} GiB; {time.perf_counter() - start:.0f} s for {n} steps)")
            if not args.compiled_only:
                diff = max(float((a - b).abs().max()) for a, b in zip(wa, wb))
                scale = max(float(a.abs().max()) for a in wa)
                emit(f"{label}: after {n} steps eager vs compiled: losses {[round(x, 4) for x in la]} vs "
                     f"{[round(x, 4) for x in lb]}; max |LoRA weight diff| {diff:.3g} (weights up to {scale:.3g})")
            t, _, _, _ = run_steps(backend, z0, cond, 3, settings, "inductor", checkpointing, 1, spec)
            emit(f"{label}: fresh adapter (a later clip) compiled first step {t[0]:.2f} s, then {t[-1] * 1e3:.0f} ms")
        except Exception as error:  # a failing compile is a result too
            emit(f"{label}: compile FAILED: {type(error).__name__}: {str(error).splitlines()[0][:300]}")
    if name == "diffusers" and args.dtype_lever:
        dtype_lever(backend, z0, cond, settings, hw, frames, context, emit)


def dtype_lever(backend, z0, cond, settings, hw, frames, context, emit):
    from i2vedit_core.backends import diffusers_lora

    x2, c2 = inputs(backend, frames, (576, 1024), context, batch=2)
    for full in (True, False):
        t, _, _, _ = run_steps_with(backend, z0, cond, settings, full)
        backend.attach_lora(LoraSpec())
        diffusers_lora.set_full_precision(backend.unet, full)
        with torch.no_grad():
            b2 = floors.timed(lambda: backend.denoise(x2, 1.0, c2, lora_scale=1.0), 3)
        backend.detach_lora()
        emit(f"diffusers LoRA branch {'fp32 (peft)' if full else 'in activation dtype'}: training step "
             f"{median(t[2:]) * 1e3:.0f} ms, b2 forward with LoRA {b2 * 1e3:.0f} ms")


def run_steps_with(backend, z0, cond, settings, full_precision):
    from i2vedit_core.backends import diffusers_lora

    original = backend.attach_lora

    def attach(spec, generator=None):
        original(spec, generator)
        diffusers_lora.set_full_precision(backend.unet, full_precision)

    backend.attach_lora = attach
    try:
        return run_steps(backend, z0, cond, 7, settings, None)
    finally:
        del backend.attach_lora


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", nargs="+", choices=("comfy", "diffusers"), default=["diffusers", "comfy"])
    parser.add_argument("--comfyui", default=None)
    parser.add_argument("--steps", type=int, default=6, help="steady steps timed")
    parser.add_argument("--checkpointing", nargs="+", choices=("0", "3", "all"), default=["0"],
                        help="levels recomputed in backward: 0 (fast tier), 3 (24gb), all (12gb)")
    parser.add_argument("--warm", action="store_true",
                        help="then the compiled runs again in a second process sharing the inductor cache")
    parser.add_argument("--compiled-only", action="store_true", help=argparse.SUPPRESS)  # --warm's second process
    parser.add_argument("--dtype-lever", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    def emit(text):
        print(text, flush=True)
        if args.out:
            with open(Path(args.out) / "compile_step.md", "a") as f:
                f.write(text + "\n")

    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.warm:
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="inductor-"))
    if "comfy" in args.backend:
        builders.setup_comfyui(args.comfyui)
    emit(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}: training step eager vs torch.compile"
         f"{' (second process, warm inductor cache)' if args.compiled_only else ''}")
    torch.manual_seed(0)
    modules = builders.diffusers_modules("cuda", 14)
    for name in args.backend:
        if name == "diffusers":
            backend = builders.diffusers_backend(modules)
        else:
            parts = builders.comfy_parts(modules)
            for m in modules:
                m.to("cpu")
            backend = builders.comfy_backend(parts)
        bench(name, backend, args, emit)
        if name == "comfy":
            backend.release()
        del backend
        torch.cuda.empty_cache()
    if args.warm:
        argv = [a for a in sys.argv[1:] if a != "--warm"] + ["--compiled-only"]
        subprocess.run([sys.executable, __file__] + argv, check=True, env=dict(os.environ))


if __name__ == "__main__":
    main()
