"""Which lines of ComfyUI's SVD launch the GPU time of the floor's own calls (no pack code runs here).

    python bench/op_sources.py --comfyui /path/to/ComfyUI [--top 30] [--out DIR]

Full-size random SVD as ComfyUI loads it (fp16 UNet), profiled with Python stacks: the floor's plain batch-1
`apply_model` at 576x1024 (an inversion or editing call) and the floor's bare-LoRA training step at 512x896 under
bf16 autocast (bench/floors.py). For each: the largest kernels by GPU time with their whole names, and the aten
operators by the GPU time of the kernels they launched themselves, with the ComfyUI lines that called them. A
backward operator has no Python stack (autograd's thread runs it); its forward's line is the one to read.
With --pack, the pack's own eager training step (fast tier) the same way.
Then the attention kernels the matched layers could use, timed on their shapes: FlashAttention-2 against cuDNN's
fused attention, both with the log-sum-exp; and F.group_norm against the pack's split-statistics GroupNorm.
"""

import argparse
import contextlib
import sys
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import builders  # noqa: E402
import floors  # noqa: E402
from report import Report  # noqa: E402
from compile_step import inputs  # noqa: E402
from step_profile import floor_step, pack_step  # noqa: E402

FORWARD = dict(hw=(576, 1024), frames=14)
TRAIN = dict(hw=(512, 896), frames=14, context=1024)
TINY_FORWARD = dict(hw=(64, 64), frames=4)
TINY_TRAIN = dict(hw=(64, 64), frames=14, context=builders.TINY_CONTEXT)


def profile_stacks(run):
    """The profiler of one call of `run` (after one warm-up call), with Python stacks."""
    from torch.profiler import ProfilerActivity, profile

    run()
    floors.sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities, with_stack=True, record_shapes=True) as prof:
        run()
        floors.sync()
    return prof


def device_ms(event, self_only=False):
    """The GPU time of an event (its own kernels' with self_only); on the CPU (smoke runs) its CPU time."""
    kind = "device" if torch.cuda.is_available() else "cpu"
    return getattr(event, ("self_" if self_only else "") + f"{kind}_time_total", 0.0) / 1e3


def callers(event, frames=3):
    """Who launched an operator: its aten parents up to the first Python frame outside torch (or, in backward, the
    autograd node), then that frame and the next `frames - 1` Python functions (file(first line): name)."""
    chain, python = [], []
    parent = event.cpu_parent
    while parent is not None and len(python) < frames:
        name = parent.name
        if name.startswith("autograd::engine::evaluate_function"):
            break  # the node's own op (e.g. MmBackward0) is already in the chain
        if "(" in name and ".py(" in name:
            if "torch/" not in name and "op_sources.py" not in name:
                python.append(name.split("/")[-1])
        elif not python and not name.startswith("<built-in"):
            chain.append(name)
        parent = parent.cpu_parent
    return " ← ".join(chain[:3] + python)


def report(emit, title, prof, top):
    kernels = defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA or not torch.cuda.is_available():
            kernels[event.name] += device_ms(event, self_only=True)
    total = sum(kernels.values())
    emit(f"\n## {title}: {total:.0f} ms of GPU kernels\n\n| kernel | ms | share |\n|---|---|---|")
    for name in sorted(kernels, key=lambda k: -kernels[k])[:top]:
        emit(f"| `{name[:200]}` | {kernels[name]:.1f} | {kernels[name] / max(total, 1e-9):.1%} |")
    sources, calls = defaultdict(float), defaultdict(int)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CPU and device_ms(event, True) > 0 \
                and not event.name.endswith(")") and ".py(" not in event.name:
            key = (event.name, callers(event))
            sources[key] += device_ms(event, True)
            calls[key] += 1
    emit("\n| aten operator | its kernels' ms | calls | called from |\n|---|---|---|---|")
    for key in sorted(sources, key=lambda k: -sources[k])[:top]:
        emit(f"| `{key[0]}` | {sources[key]:.1f} | {calls[key]} | {key[1]} |")
    attention_by_shape(emit, prof)


def attention_by_shape(emit, prof):
    """The attention kernels' time by the (q, k) shapes SDPA dispatched to each of them."""
    rows = [e for e in prof.key_averages(group_by_input_shape=True)
            if "attention" in e.key and ("forward" in e.key or "backward" in e.key) and device_ms(e, True) > 0]
    emit("\n| attention operator | q, k, ... shapes | calls | ms |\n|---|---|---|---|")
    for e in sorted(rows, key=lambda e: -device_ms(e, True)):
        emit(f"| `{e.key}` | {str(e.input_shapes[:2])[:90]} | {e.count} | {device_ms(e, True):.2f} |")


def plain_forward(model, size):
    import comfy.model_management as mm

    fresh = model.clone()
    mm.load_models_gpu([fresh])
    device = torch.device(fresh.load_device)
    x, sigma, c = floors.comfy_inputs(fresh.model, device, 1, size["frames"], size["hw"],
                                      torch.Generator(device).manual_seed(0))

    def run():
        with torch.no_grad():
            fresh.model.apply_model(x, sigma, **c)
    return run


@contextlib.contextmanager
def pack_training_step(parts, size):
    """The pack's eager training step (fast tier, the real LoRA spec) through a ComfyBackend on `parts`, released
    on exit."""
    import comfy.model_management as mm
    from i2vedit_core.lora import LoraSpec
    from i2vedit_core.training import TrainingSettings

    backend = builders.comfy_backend(parts)
    z0, cond = inputs(backend, size["frames"], size["hw"], size["context"])
    mm.load_models_gpu([backend.patcher])
    try:
        with backend.lora_training(False):
            yield pack_step(backend, z0, cond, LoraSpec(), TrainingSettings())
    finally:
        backend.detach_lora()
        backend.release()


def attention_kernels(emit, frames=14, reps=10):
    """Flash-2 against cuDNN's fused attention, both with the log-sum-exp, on the matched layers' shapes."""
    if not torch.cuda.is_available():
        return
    emit("\n## Attention with its log-sum-exp on the matched layers' shapes (fp16, one video of 14 frames)\n\n"
         "| tokens | heads | flash-2 ms | cuDNN ms | out max diff | lse max diff |\n|---|---|---|---|---|---|")
    for tokens, heads in ((9216, 5), (2304, 10), (576, 20)):
        q, k, v = (torch.randn(frames, heads, tokens, 64, device="cuda", dtype=torch.float16) for _ in range(3))
        calls = {"flash": lambda: torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False),
                 "cudnn": lambda: torch.ops.aten._scaled_dot_product_cudnn_attention(
                     q, k, v, None, True, 0.0, False, False)}
        results, times = {}, {}
        for name, call in calls.items():
            try:
                results[name] = call()
                times[name] = floors.timed(call, reps) * 1e3
            except RuntimeError as error:
                results[name], times[name] = None, float("nan")
                emit(f"<!-- {name} refused {tokens} tokens: {str(error).splitlines()[0][:150]} -->")
        out_diff = lse_diff = float("nan")
        if results["flash"] is not None and results["cudnn"] is not None:
            out_diff = float((results["flash"][0].float() - results["cudnn"][0].float()).abs().max())
            lse_f, lse_c = results["flash"][1].float(), results["cudnn"][1].float()
            emit(f"<!-- lse shapes: flash {tuple(lse_f.shape)}, cuDNN {tuple(lse_c.shape)} -->")
            lse_diff = float((lse_f.reshape(lse_c.shape) - lse_c).abs().max()) if lse_f.numel() == lse_c.numel() \
                else float("nan")
        emit(f"| {tokens} | {heads} | {times['flash']:.2f} | {times['cudnn']:.2f} | {out_diff:.2e} | {lse_diff:.2e} |")


def group_norm_kernels(emit, reps=10):
    """F.group_norm against the pack's split-statistics GroupNorm on SVD's shapes: inference (fp16) and a training
    step's forward + backward (bf16 input under autocast, as ComfyUI's fp16 UNet trains)."""
    if not torch.cuda.is_available():
        return
    from i2vedit_core.group_norm import group_norm

    emit("\n## GroupNorm on SVD's shapes (32 groups)\n\n| input | pass | F.group_norm ms | split statistics ms | "
         "max diff |\n|---|---|---|---|---|")
    shapes = ((14, 320, 72, 128), (1, 320, 14, 72, 128), (14, 640, 36, 64), (1, 1280, 14, 18, 32))
    for shape in shapes:
        x = torch.randn(shape, device="cuda", dtype=torch.float16)
        w, b = (torch.randn(shape[1], device="cuda", dtype=torch.float16) for _ in range(2))
        times = [floors.timed(lambda f=f: f(x, 32, w, b, 1e-5), reps) * 1e3 for f in (F.group_norm, group_norm)]
        diff = float((F.group_norm(x, 32, w, b, 1e-5).float() - group_norm(x, 32, w, b, 1e-5).float()).abs().max())
        emit(f"| {tuple(shape)} fp16 | forward | {times[0]:.3f} | {times[1]:.3f} | {diff:.1e} |")
        xb = x.to(torch.bfloat16).requires_grad_()
        grad = torch.randn(shape, device="cuda")

        def step(f):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = f(xb, 32, w, b, 1e-5)
            y.backward(grad)
        times = [floors.timed(lambda f=f: step(f), reps) * 1e3 for f in (F.group_norm, group_norm)]
        emit(f"| {tuple(shape)} bf16, autocast | forward + backward | {times[0]:.3f} | {times[1]:.3f} | |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfyui", required=True)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--pack", action="store_true", help="also profile the pack's own training step")
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU (smoke run)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    emit = Report()
    parts = builders.comfy_profile_parts(args.comfyui, args.tiny, 14)
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    emit(f"# Where the floor's GPU time goes, ComfyUI {parts['dtype']} ({name}, torch {torch.__version__})")
    forward, train = (TINY_FORWARD, TINY_TRAIN) if args.tiny else (FORWARD, TRAIN)
    emit_size = f"{forward['frames']} frames at {forward['hw'][0]}x{forward['hw'][1]}"
    report(emit, f"plain batch-1 forward, {emit_size}", profile_stacks(plain_forward(parts["model"], forward)),
           args.top)
    step = floor_step(parts["model"], train)
    report(emit, f"bare-LoRA training step, bf16 autocast, {train['hw'][0]}x{train['hw'][1]}", profile_stacks(step),
           args.top)
    if args.pack:
        with pack_training_step(parts, train) as step:
            report(emit, f"the pack's eager training step, {train['hw'][0]}x{train['hw'][1]}", profile_stacks(step),
                   args.top)
    attention_kernels(emit)
    group_norm_kernels(emit)
    emit.write(args.out, "op_sources.md")


if __name__ == "__main__":
    main()
