"""One clip end to end on full-size random-weight SVD, per backend, against two floors from the same run.

    python bench/e2e.py --backend comfy diffusers --comfyui /path/to/ComfyUI      # both, default memory
    python bench/e2e.py --backend comfy --budget 24 12 --comfyui ...              # also under GiB caps
    python bench/e2e.py --tiny --backend diffusers                                # CPU smoke run (CI)

Stages: SARP + 25-step inversion; motion-LoRA training (250 steps at 512x896; `--train-steps N`
times N steps and scales the stage to 250, per-step cost being constant); 25 matched denoising steps
with CFG and the recomputed source branch; VAE decode. Backends: ComfyUI's own SVD classes in the
dtype ComfyUI picks (fp16 UNet on a GPU), diffusers in bf16; both hold the same random weights.

Floors, each measured in the same run on the same weights:
  eager  the host's plain calls with none of this pack's code (bench/floors.py): 25 b1 forwards,
         250 plain rank-32 LoRA steps (peft / a bare wrapper, bf16 autocast, no checkpointing),
         25 x (b2 + b1) forwards + one plain decode of the clip;
  own    the same counts through the pack's `backend.denoise` with its own LoRA (the old floor).
`--budget G` caps the process at G GiB (torch.cuda.set_per_process_memory_fraction; ComfyUI's model
management is told the same through its reserved-VRAM setting) and runs with the memory policy of
that budget. `--out DIR` also writes each table and a JSON record there.
"""

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import builders  # noqa: E402
import floors as eager  # noqa: E402
from i2vedit_core.backends.base import Conditioning  # noqa: E402
from i2vedit_core import memory  # noqa: E402
from i2vedit_core.inversion import InversionSettings  # noqa: E402
from i2vedit_core.lora import LoraSpec  # noqa: E402
from i2vedit_core.pipeline import (PipelineSettings, check_edited_frames, invert_video, prepare_video,  # noqa: E402
                                   propagate, train_loras)
from i2vedit_core.tiny import synthetic_clip  # noqa: E402
from i2vedit_core.training import TrainingSettings  # noqa: E402

GIB = 2 ** 30
FULL = dict(hw=(576, 1024), train_hw=(512, 896), steps=25, train_steps=250, frames=14, context=1024)
TINY = dict(hw=(64, 64), train_hw=(64, 64), steps=3, train_steps=3, frames=4, context=builders.TINY_CONTEXT)


def memory_settings(budget, **kwargs) -> PipelineSettings:
    """PipelineSettings under the core's memory policy for `budget` GiB (None: the default, auto)."""
    return PipelineSettings(memory=budget if budget is not None else "auto", **kwargs)


def own_floors(backend, frames, hw, train_hw, context, reps=3) -> dict:
    """Per-call seconds through the pack's own denoise and LoRA (the pack's floor)."""
    device = backend.device

    def inputs(batch, size):
        shape = (batch, frames, 4, size[0] // 8, size[1] // 8)
        cond = Conditioning(torch.randn(batch, 1, context, device=device),
                            torch.randn(shape, device=device), torch.tensor([[6.0, 127.0, 0.02]] * batch, device=device))
        return torch.randn(shape, device=device), cond

    out = {}
    with torch.no_grad():
        for batch in (1, 2):
            x, c = inputs(batch, hw)
            out[f"b{batch}"] = eager.timed(lambda: backend.denoise(x, 1.0, c, lora_scale=0.0), reps)
    xt, ct = inputs(1, train_hw)
    backend.attach_lora(LoraSpec())
    optimizer = torch.optim.AdamW(backend.lora_parameters(), lr=1e-4)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out_ = backend.denoise(xt, 1.0, ct, lora_scale=1.0)
        out_.float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with backend.lora_training():
        out["train_step"] = eager.timed(step, reps, warmup=2)
    backend.detach_lora()
    return out


class LatentRecorder:
    """Wraps backend.decode to keep the final latents the pipeline decodes (compared across runs)."""

    def __init__(self, backend):
        self.latents, self.inner = [], backend.decode
        backend.decode = self

    def __call__(self, latents, chunk_size=8):
        self.latents.append(latents.detach().float().cpu())
        return self.inner(latents, chunk_size)


def peak_gib():
    return torch.cuda.max_memory_allocated() / GIB if torch.cuda.is_available() else float("nan")


def stage(fn):
    eager.sync()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = fn()
    eager.sync()
    return result, time.perf_counter() - start, peak_gib()


def run_video(backend, frames: int, hw, settings: PipelineSettings, target_train_steps=None):
    """Stage seconds and peaks of one edit of a synthetic video; the final latents of each clip.

    target_train_steps: report training as if each clip ran that many steps: the measured stage plus
    (target - steps) x the clip's mean seconds per step after its first (one-off costs stay counted once)."""
    source = synthetic_clip(frames, *hw, seed=1)
    edited = source[0].clone()
    edited[:, hw[0] // 6:hw[0] // 2, hw[1] // 5:hw[1] // 2] = torch.tensor([0.8, 0.2, -0.5]).view(3, 1, 1)
    video = prepare_video(source, settings)
    edits = check_edited_frames(edited[None], video.fit)
    recorder = LatentRecorder(backend)
    timings = {}
    try:
        inversions, t_inv, m_inv = stage(lambda: invert_video(backend, video, settings))
        marks = {}
        progress = (lambda p: marks.setdefault(p["clip"], []).append(time.perf_counter())
                    if p["stage"] == "train" and p["step"] > 0 else None)
        loras, t_train, m_train = stage(lambda: train_loras(backend, video, settings, progress=progress))
        t_train = extrapolate(t_train, marks.values(), settings.training.steps, target_train_steps)
        result, t_edit, m_edit = stage(lambda: propagate(backend, video, inversions, loras, edits, settings,
                                                          timings=timings))
    finally:
        backend.decode = recorder.inner
    assert result[0].frames.shape == source.shape and bool(torch.isfinite(result[0].frames).all())
    rows = dict(invert=t_inv, train=t_train, edit=t_edit - timings.get("decode", 0.0), decode=timings.get("decode", 0.0))
    return rows, dict(invert=m_inv, train=m_train, edit=m_edit, decode=m_edit), recorder.latents


def extrapolate(seconds: float, clip_marks, steps: int, target) -> float:
    """Stage seconds as if every clip ran `target` steps: each clip's time stamps after steps 1..N give
    its median per-step time after the first step (a compile or recompile in one step is a one-off
    cost: it stays counted once, as the data preparation and the first step do)."""
    if not target or steps < 2:
        return seconds
    for times in clip_marks:
        gaps = sorted(b - a for a, b in zip(times, times[1:]))
        seconds += (target - steps) * gaps[len(gaps) // 2]
    return seconds


def floor_seconds(per_call: dict, steps: int, train_steps: int) -> dict:
    return dict(invert=steps * per_call["b1"], train=train_steps * per_call["train_step"],
                edit=steps * (per_call["b2"] + per_call["b1"]), decode=per_call.get("decode", 0.0))


NAMES = (("invert", "SARP + inversion"), ("train", "motion LoRA"), ("edit", "matched editing"), ("decode", "VAE decode"))


def table(title, rows, mems, eager_floor, own_floor, train_scale=None) -> str:
    lines = [f"## {title}", "", "| stage | seconds | eager floor (s) | x eager | own floor (s) | x own | peak GiB |",
             "|---|---|---|---|---|---|---|"]
    total = total_eager = total_own = 0.0
    for key, name in NAMES:
        seconds = rows[key]
        fe, fo = eager_floor[key], own_floor.get(key, 0.0)
        total, total_eager, total_own = total + seconds, total_eager + fe, total_own + fo
        lines.append(f"| {name} | {seconds:.1f} | {fe:.1f} | {_ratio(seconds, fe)} | {fo:.1f} | {_ratio(seconds, fo)} "
                     f"| {mems[key]:.1f} |")
    lines.append(f"| **whole clip** | **{total:.1f}** | **{total_eager:.1f}** | **{_ratio(total, total_eager)}** | "
                 f"{total_own:.1f} | {_ratio(total, total_own)} | {max(mems.values()):.1f} |")
    return "\n".join(lines)


def _ratio(a, b):
    return f"{a / b:.2f}" if b > 0 else "-"


def cap_memory(budget, comfy: bool):
    """Cap this process at `budget` GiB (None: lift the cap); ComfyUI reserves the rest of the card."""
    gc.collect()
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(1.0 if budget is None else min(1.0, budget * GIB / total))
    if comfy:
        import comfy.model_management as mm

        mm.EXTRA_RESERVED_VRAM = 400 * 2 ** 20 if budget is None else int(total - budget * GIB + 400 * 2 ** 20)
        mm.unload_all_models()
        mm.soft_empty_cache()


def bench_backend(name, modules, args, size, out):
    """All runs of one backend; returns {label: record}."""
    records = {}
    frames, hw, train_hw = size["frames"], size["hw"], size["train_hw"]
    cuda = torch.cuda.is_available()
    if name == "comfy":
        parts = builders.comfy_parts(modules, **({} if cuda else builders.TINY_COMFY))
        if cuda:
            for m in modules:
                m.to("cpu")
        backend = builders.comfy_backend(parts)
        floor = eager.comfy_floors(parts["model"], parts["vae"], frames, hw, train_hw, args.reps)
        dtype = str(parts["dtype"])
    else:
        backend = builders.diffusers_backend(modules, torch.bfloat16 if cuda else torch.float32,
                                             "cuda" if cuda else "cpu")
        floor = eager.diffusers_floors(backend.unet, backend.vae, frames, hw, train_hw, args.reps)
        dtype = str(backend.dtype)
    own = own_floors(backend, frames, hw, train_hw, size["context"], args.reps)
    if name == "comfy" and args.lever_ab:
        backend.lora.full_precision = True
        upcast = own_floors(backend, frames, hw, train_hw, size["context"], args.reps)
        backend.lora.full_precision = False
        emit(out, f"lever A/B, pack LoRA step through denoise: branch in activation dtype "
                  f"{own['train_step'] * 1e3:.0f} ms, upcast to fp32 {upcast['train_step'] * 1e3:.0f} ms")
    own["decode"] = floor["decode"]
    steps, train_steps = size["steps"], size["train_steps"]
    eager_floor, own_floor = floor_seconds(floor, steps, train_steps), floor_seconds(own, steps, train_steps)
    header = (f"{name} backend, UNet {dtype}; per call: eager b1 {floor['b1'] * 1e3:.0f} ms, b2 "
              f"{floor['b2'] * 1e3:.0f} ms, b3 {floor['b3'] * 1e3:.0f} ms, LoRA step {floor['train_step'] * 1e3:.0f} ms, "
              f"decode {floor['decode']:.2f} s; own b1 {own['b1'] * 1e3:.0f} ms, b2 {own['b2'] * 1e3:.0f} ms, "
              f"LoRA step {own['train_step'] * 1e3:.0f} ms")
    emit(out, header)
    train_scale = 1.0  # run_video extrapolates training to train_steps itself
    training = TrainingSettings(steps=args.train_steps, compile={"plan": None, "on": True, "off": False}[args.compile])
    inversion = InversionSettings(steps=steps)
    budgets = list(args.budget) if name in (args.budget_backend or args.backend) else []
    runs = [(budget, again) for budget in ([] if args.budgets_only else [None]) + budgets
            for again in ((False, True) if args.again else (False,))]
    for budget, again in runs:
        first = f"{name}-{'default' if budget is None else f'{budget:g}GiB'}"
        label = first + ("-again" if again else "")
        if again and name == "comfy":  # the next prompt: a new backend on a clone of the same MODEL
            backend.release()
            backend = builders.comfy_backend(parts)
        if cuda:
            cap_memory(budget, name == "comfy")
        settings = memory_settings(budget, training=training, inversion=inversion, working_size=hw, clip_length=frames)
        try:
            rows, mems, latents = run_video(backend, frames, hw, settings, train_steps)
        except torch.cuda.OutOfMemoryError as error:
            cause = error.__cause__ or error
            emit(out, f"\n{label}: {str(error).splitlines()[0][:200]} ({str(cause).splitlines()[0][:400]})")
            records[label] = dict(oom=True)
            del error
            gc.collect()  # the traceback's frames hold the failed stage's tensors: free them before the next run
            continue
        finally:
            if cuda:
                cap_memory(None, name == "comfy")
        plan = settings.memory.plan(backend.device, getattr(backend, "free_memory", None))
        if training.compile is not None:  # --compile on|off overrides the plan's switch: show what ran
            plan = dataclasses.replace(plan, compile=training.compile)
        title = (f"{label}: one clip, {frames} frames at {hw[0]}x{hw[1]} ({_device_name()}; {plan}; training ran "
                 f"{args.train_steps} steps, extrapolated to {train_steps} by its per-step time"
                 f"{again_text(name) if again else ''})")
        emit(out, "\n" + table(title, rows, mems, eager_floor, own_floor, train_scale))
        records[label] = dict(rows=rows, mems=mems, eager=eager_floor, own=own_floor, per_call=floor, own_per_call=own,
                              train_scale=train_scale, budget=budget, dtype=dtype, latents=latents)
        reference = first if again else f"{name}-default"
        if reference != label:
            compare_latents(records, label, latents, reference, out)
    if name == "comfy" and args.lever_ab:
        backend.lora.full_precision = True
        settings = memory_settings(None, training=training, inversion=inversion, working_size=hw, clip_length=frames)
        rows, mems, latents = run_video(backend, frames, hw, settings, train_steps)
        backend.lora.full_precision = False
        label = f"{name}-default-fp32-lora-branch"
        emit(out, "\n" + table(f"{label} (the lever off; otherwise as {name}-default)", rows, mems, eager_floor,
                               own_floor, train_scale))
        compare_latents(records, label, latents, f"{name}-default", out)
    if args.layers_ab:
        with training_layers_off():
            settings = memory_settings(None, training=training, inversion=inversion, working_size=hw,
                                       clip_length=frames)
            rows, mems, latents = run_video(backend, frames, hw, settings, train_steps)
        label = f"{name}-default-training-layers-off"
        emit(out, "\n" + table(f"{label} (LayerNorm/GroupNorm under autocast in float32, GEGLU as PyTorch's ops, as "
                               f"before run 11; otherwise as {name}-default)", rows, mems, eager_floor, own_floor,
                               train_scale))
        compare_latents(records, label, latents, f"{name}-default", out)
    if args.graph_ab:
        eager_training = dataclasses.replace(training, cuda_graph=False)
        settings = memory_settings(None, training=eager_training, inversion=inversion, working_size=hw,
                                   clip_length=frames)
        rows, mems, latents = run_video(backend, frames, hw, settings, train_steps)
        label = f"{name}-default-eager-training"
        emit(out, "\n" + table(f"{label} (training step not captured as a CUDA graph; otherwise as {name}-default)",
                               rows, mems, eager_floor, own_floor, train_scale))
        compare_latents(records, label, latents, f"{name}-default", out)
    if name == "comfy" and args.scale:
        import scale
        scale.scale_runs(backend, records, args, out, emit, run_video, memory_settings, size)
    if name == "comfy":
        backend.release()
    return records, backend


@contextlib.contextmanager
def training_layers_off():
    """The training step's norms in autocast's float32 and GEGLU as PyTorch's ops (norm_precision.py, geglu.py)."""
    from i2vedit_core import geglu, group_norm, layer_norm

    saved = (group_norm.keeps_activation_dtype, layer_norm.keeps_activation_dtype, geglu.runs_fused)
    group_norm.keeps_activation_dtype = layer_norm.keeps_activation_dtype = lambda *a: False
    geglu.runs_fused = lambda p: False
    try:
        yield
    finally:
        group_norm.keeps_activation_dtype, layer_norm.keeps_activation_dtype, geglu.runs_fused = saved


def again_text(name):
    where = "a new backend on the same MODEL, as the next prompt" if name == "comfy" else "the same backend"
    return f"; the same edit again in the same process, through {where}"


def compare_latents(records, label, latents, reference, out):
    ref = records.get(reference, {}).get("latents")
    if ref is None:
        return
    diff = max(float((a - b).abs().max()) for a, b in zip(latents, ref))
    scale_ = max(float(b.abs().max()) for b in ref)
    emit(out, f"{label}: max |latent - {reference} latent| = {diff:.3g} (latents up to {scale_:.3g})")
    records.setdefault(label, {})[f"max_latent_diff_vs_{reference}"] = diff


def _device_name():
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"


def emit(out, text):
    print(text, flush=True)
    if out is not None:
        with open(Path(out) / "e2e.md", "a") as f:
            f.write(text + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", nargs="+", choices=("comfy", "diffusers"), default=["comfy", "diffusers"])
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"), help="ComfyUI work tree (comfy backend)")
    parser.add_argument("--budget", nargs="*", type=float, default=[], help="GiB caps to run under, e.g. 24 12")
    parser.add_argument("--budgets-only", action="store_true", help="skip the run at the default memory setting")
    parser.add_argument("--budget-backend", nargs="*", default=None, help="backends the budgets apply to (all)")
    parser.add_argument("--train-steps", type=int, default=None, help="steps timed (scaled to 250 in the table)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--compile", choices=("plan", "on", "off"), default="plan",
                        help="torch.compile of the training UNet: as the memory plan says (default), or forced")
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU (smoke run)")
    parser.add_argument("--out", default=None, help="folder for e2e.md and e2e.json")
    parser.add_argument("--lever-ab", action="store_true", help="comfy: also run with the LoRA branch upcast to fp32")
    parser.add_argument("--graph-ab", action="store_true",
                        help="also run the default setting with the training step eager (no CUDA graph)")
    parser.add_argument("--layers-ab", action="store_true",
                        help="also run with the training step's LayerNorm/GroupNorm/GEGLU as before run 11")
    parser.add_argument("--again", action="store_true",
                        help="run each setting twice in one process: the second edit is what the next edit costs "
                             "with the UNet already compiled. comfy: through a new backend on the same MODEL, as "
                             "the next ComfyUI prompt runs (nodes build one per execution); diffusers: through the "
                             "same backend, as a Python API user keeps it")
    parser.add_argument("--scale", action="store_true", help="comfy: 2-clip video, 25 frames, 768x1344 (scale.py)")
    parser.add_argument("--no-two-clips", action="store_true", help="--scale: only the peak-memory runs")
    parser.add_argument("--scale-train-steps", type=int, default=5, help="training steps per clip in the 2-clip run")
    parser.add_argument("--tier-layers", nargs=2, metavar=("TIER", "LAYERS"), default=None,
                        help="try another recomputed layer set for a tier (memory.parse_layers text, e.g. 24gb "
                             "0,1t,2t) before it goes in memory.PLANS")
    args = parser.parse_args(argv)
    if args.tier_layers:
        tier, layers = args.tier_layers
        memory.PLANS = tuple((dataclasses.replace(plan, checkpointing=memory.parse_layers(layers))
                              if plan.tier == tier else plan, gib) for plan, gib in memory.PLANS)
    size = TINY if args.tiny else FULL
    args.train_steps = args.train_steps or size["train_steps"]
    if not args.tiny and not torch.cuda.is_available():
        sys.exit("needs CUDA (or --tiny for the CPU smoke run)")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
    if "comfy" in args.backend:
        builders.setup_comfyui(args.comfyui or sys.exit("--backend comfy needs --comfyui PATH"), cpu=args.tiny)
    torch.manual_seed(0)
    emit(args.out, f"# {_device_name()}, torch {torch.__version__}")
    modules = builders.tiny_modules(full_vae="comfy" in args.backend) if args.tiny else builders.diffusers_modules("cuda", size["frames"])
    records = {}
    for name in args.backend:
        result, backend = bench_backend(name, modules, args, size, args.out)
        records.update(result)
        del backend
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    compare_backends(records, args.out)
    if args.out:
        clean = {k: {kk: vv for kk, vv in v.items() if kk != "latents"} for k, v in records.items()}
        (Path(args.out) / "e2e.json").write_text(json.dumps(clean, indent=1, default=str))
    return records


def compare_backends(records, out):
    a, b = records.get("comfy-default", {}), records.get("diffusers-default", {})
    if "latents" in a and "latents" in b:
        diff = max(float((x - y).abs().max()) for x, y in zip(a["latents"], b["latents"]))
        scale = max(float(y.abs().max()) for y in b["latents"])
        emit(out, f"\nsame weights, same inputs: max |comfy fp16 latent - diffusers bf16 latent| = {diff:.3g} "
                  f"(latents up to {scale:.3g}): the spread half-precision rounding alone produces")


if __name__ == "__main__":
    main()
