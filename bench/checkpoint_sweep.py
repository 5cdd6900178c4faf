"""Which layers to recompute for a memory cap: time and peak of the training step per checkpointed layer set.

    python bench/checkpoint_sweep.py --comfyui /path/to/ComfyUI [--backend comfy diffusers] [--fit 14 18 20]

Full-size random SVD, 14 frames at 512x896 (training's size), the real LoRA spec, the step as training runs it
(captured and replayed where the backend can be captured with that set, else eager). For each backend:
1. the bare-LoRA floor step (comfy: `step_profile.floor_step`, no pack code), no checkpointing, all
   (`--checkpointing all`, the 12gb tier) and the 24gb tier's set;
2. every layer group, a (resolution level, kind) pair, left out of the full set in turn: the step time it saves
   and the memory it adds when its activations are kept;
3. for each `--fit` GiB, the set a greedy pick from (2) predicts to fit that peak fastest (groups by time saved
   per GiB added), measured: the predicted and the measured peak and time.
The peak is torch's allocated maximum over the warm-up, the capture and the replays (what training holds).
"""

import argparse
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import builders  # noqa: E402
from compile_step import inputs  # noqa: E402
from step_profile import FULL, TINY, floor_step, graphed_step, pack_step, timed_steps  # noqa: E402
from i2vedit_core.lora import LoraSpec  # noqa: E402
from i2vedit_core.memory import checkpointed_layers, layers_text, parse_layers, plan_of  # noqa: E402
from i2vedit_core.training import TrainingSettings  # noqa: E402

GIB = 2 ** 30


def measure(backend, z0, cond, setting, steps):
    """(ms per step, peak GiB, captured) of training steps with `setting` checkpointed."""
    cuda = backend.device.type == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    captured = cuda and backend.capturable_training(setting)
    with torch.random.fork_rng(devices=[backend.device] if cuda else []), backend.lora_training(setting):
        step = (graphed_step if captured else pack_step)(backend, z0, cond, LoraSpec(), TrainingSettings())
        for _ in range(getattr(step, "warmup", 0)):
            step()
        wall, _ = timed_steps(step, steps)
        if hasattr(step, "captured"):
            step.captured.release()
    backend.detach_lora()
    peak = torch.cuda.max_memory_allocated() / GIB if cuda else float("nan")
    return wall * 1e3, peak, captured


def greedy_fit(full_ms, full_peak, gains, cap):
    """The groups to keep (not recompute) so that the predicted peak stays under `cap`: best time saved per GiB
    first. gains: {group: (ms saved, GiB added)}. Returns (kept groups, predicted ms, predicted GiB)."""
    kept, ms, peak = [], full_ms, full_peak
    for group, (saved, added) in sorted(gains.items(), key=lambda g: -g[1][0] / max(g[1][1], 1e-3)):
        if saved > 0 and peak + added <= cap:
            kept.append(group)
            ms, peak = ms - saved, peak + added
    return kept, ms, peak


def sweep(emit, name, backend, z0, cond, levels, fits, steps, floor_ms=None):
    every = checkpointed_layers(levels, True)
    emit(f"\n## {name}\n\n| checkpointed | ms | x none | peak GiB | captured |\n|---|---|---|---|---|")
    if floor_ms is not None:
        emit(f"| floor (bare LoRA, no pack code) | {floor_ms:.0f} | | | |")
    rows = {}

    def row(label, setting):
        ms, peak, captured = measure(backend, z0, cond, setting, steps)
        rows[label] = (ms, peak)
        base = rows.get("none", (ms, peak))[0]
        emit(f"| {label} | {ms:.0f} | {ms / base:.2f} | {peak:.1f} | {'yes' if captured else 'no'} |")
        return ms, peak

    row("none", False)
    full_ms, full_peak = row("all", True)
    row(f"24gb tier ({layers_text(checkpointed_layers(levels, plan_of('24gb').checkpointing))})",
        plan_of("24gb").checkpointing)
    gains = {}
    for group in sorted(every):
        ms, peak = row(f"all but {layers_text(frozenset({group}))}", every - {group})
        gains[group] = (full_ms - ms, peak - full_peak)
    emit("\n| group kept | ms saved | GiB added | ms per GiB |\n|---|---|---|---|")
    for group, (saved, added) in sorted(gains.items()):
        emit(f"| {layers_text(frozenset({group}))} | {saved:.0f} | {added:.2f} | {saved / max(added, 1e-3):.0f} |")
    emit("\n| fit GiB | recomputed | predicted ms | measured ms | predicted GiB | measured GiB |\n|---|---|---|---|---|---|")
    for cap in fits:
        kept, ms, peak = greedy_fit(full_ms, full_peak, gains, cap)
        chosen = every - set(kept)
        measured_ms, measured_peak, _ = measure(backend, z0, cond, chosen or False, steps)
        emit(f"| {cap:g} | {layers_text(chosen)} | {ms:.0f} | {measured_ms:.0f} | {peak:.1f} | {measured_peak:.1f} |")
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", nargs="+", choices=("comfy", "diffusers"), default=["comfy"])
    parser.add_argument("--comfyui", default=None, help="a ComfyUI work tree (for --backend comfy)")
    parser.add_argument("--fit", nargs="*", type=float, default=[14.0, 18.0, 20.0],
                        help="training peaks (GiB) to pick the fastest recomputed set for")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--also", nargs="*", default=[], help="more sets to measure, as memory.parse_layers reads them")
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU (smoke run)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    def emit(text):
        print(text, flush=True)
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            with open(Path(args.out) / "checkpoint_sweep.md", "a") as f:
                f.write(text + "\n")

    size = TINY if args.tiny else FULL
    device = "cpu" if args.tiny else "cuda"
    emit(f"# {'CPU (tiny models)' if args.tiny else torch.cuda.get_device_name()}, torch {torch.__version__}: "
         f"training step per recomputed layer set, {size['frames']} frames at {size['hw'][0]}x{size['hw'][1]}")
    torch.manual_seed(0)
    modules = builders.tiny_modules(full_vae=True) if args.tiny else builders.diffusers_modules(device, size["frames"])
    for m in modules:  # off the device: each backend's peak counts only what that backend holds
        m.to("cpu")
    for name in args.backend:
        if name == "comfy":
            builders.setup_comfyui(args.comfyui, cpu=args.tiny)
            import comfy.model_management as mm

            parts = builders.comfy_parts(modules, **(builders.TINY_COMFY if args.tiny else {}))
            backend = builders.comfy_backend(parts)
            z0, cond = inputs(backend, size["frames"], size["hw"], size["context"])
            floor = floor_step(parts["model"], size)
            floor_ms = timed_steps(floor, args.steps)[0] * 1e3
            mm.load_models_gpu([backend.patcher])
            levels = len(backend.patcher.model.diffusion_model.channel_mult)
            title = f"ComfyUI backend, {parts['dtype']} UNet"
        else:
            backend = builders.diffusers_backend(modules, device=device,
                                                 dtype=torch.float32 if args.tiny else torch.bfloat16)
            z0, cond = inputs(backend, size["frames"], size["hw"], size["context"])
            floor_ms, levels, title = None, len(backend.unet.down_blocks), "diffusers backend, bf16 UNet"
        sweep(emit, title, backend, z0, cond, levels, args.fit, args.steps, floor_ms)
        for text in args.also:
            ms, peak, captured = measure(backend, z0, cond, parse_layers(text), args.steps)
            emit(f"| also {text} | {ms:.0f} | | {peak:.1f} | {'yes' if captured else 'no'} |")
        if hasattr(backend, "release"):
            backend.release()
        del backend
        gc.collect()


if __name__ == "__main__":
    main()
