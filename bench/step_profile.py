"""Where the ComfyUI training step's time goes: the pack's step against the bare-LoRA floor step.

    python bench/step_profile.py --comfyui /path/to/ComfyUI [--out DIR]

Full-size random SVD in ComfyUI's dtypes (fp16 UNet), 14 frames at 512x896, eager. Times (median of
`--steps` after two warm-up steps):
- floor: `floors.py`'s bare rank-32 LoRA object-patched on a fresh clone, `apply_model` + AdamW;
- pack: the core's `training_step` through `backend.denoise`, the real LoRA spec (dropout 0.1), with the
  dropped branch added by the fused kernel (`branch_dropout`) on CUDA;
- pack, unfused dropout: the same with `base + F.dropout(branch)`;
- pack, before: the LoRA forward as it was before the fused kernel (F.dropout, then the scale multiplies the
  Linear-sized branch output);
- pack, dropout 0: no dropout at all (what any dropout implementation costs);
- pack, CUDA graph: the pack's step captured once and replayed (training_graph.CapturedStep, capturable AdamW),
  and how far its losses and LoRA weights are from the same steps run eagerly.
Then one profiled step of the floor and of the pack (torch.profiler): wall time, the summed GPU kernel
time (wall minus that is time the GPU waited for the host) and the kernels whose time differs most.
"""

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import builders  # noqa: E402
import floors  # noqa: E402
from compile_step import inputs  # noqa: E402
from i2vedit_core import branch_dropout  # noqa: E402
from i2vedit_core.backends import comfy_lora  # noqa: E402
from i2vedit_core.lora import LoraSpec  # noqa: E402
from i2vedit_core.training import (TrainingSettings, draw_step_inputs, edm_weight, queue_training_step,  # noqa: E402
                                   step_on)
from i2vedit_core.training_graph import WARMUP_STEPS, CapturedStep  # noqa: E402

FULL = dict(hw=(512, 896), frames=14, context=1024)
TINY = dict(hw=(64, 64), frames=14, context=builders.TINY_CONTEXT)


def median(values):
    return sorted(values)[len(values) // 2]


def timed_steps(step, steps):
    """(median wall seconds, median host seconds) per step: host = until the step is queued, wall = until
    the GPU has run it. Host close to wall: the GPU waits for the host."""
    walls, hosts = [], []
    for i in range(steps + 2):
        floors.sync()
        start = time.perf_counter()
        step()
        queued = time.perf_counter()
        floors.sync()
        walls.append(time.perf_counter() - start)
        hosts.append(queued - start)
    return median(walls[2:]), median(hosts[2:])


def profiled(step):
    """(wall ms, summed kernel ms, {kernel name: ms}, {CPU operator: self ms}) of one step, after its warm-up."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(getattr(step, "warmup", 1)):  # a captured step: its eager warm-up calls and the capture
        step()
    floors.sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        step()
        floors.sync()
        wall = time.perf_counter() - start
    kernels = defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels[event.name[:90]] += event.device_time_total / 1e3 if hasattr(event, "device_time_total") \
                else event.cuda_time_total / 1e3
    host = {a.key[:90]: a.self_cpu_time_total / 1e3 for a in prof.key_averages()}
    return wall * 1e3, sum(kernels.values()), kernels, host


def forward_before(self, x, *args, **kwargs):
    """comfy_lora.LoraForward.__call__ before the fused kernel (commit 4238593)."""
    out = type(self.module).forward(self.module, x, *args, **kwargs)
    scale, slot = comfy_lora.current_call(self.state)[:2]
    if scale == 0:
        return out
    down, up = self.state.pair(self.path, slot)
    if down is None:
        return out
    dtype = x.dtype
    delta = F.linear(F.linear(x.to(dtype), down.to(dtype)), up.to(dtype))
    if self.state.dropout_active and self.state.spec.dropout > 0:
        delta = F.dropout(delta, self.state.spec.dropout, training=True)
    return out + (delta * scale).to(out.dtype)


class Variant:
    """Patches for one timed variant of the pack's step (undone on exit)."""

    def __init__(self, fused=True, before=False):
        self.fused, self.before = fused, before

    def __enter__(self):
        self.saved = (branch_dropout.fused_runs_on, comfy_lora.LoraForward.__call__)
        if not self.fused:
            branch_dropout.fused_runs_on = lambda base, branch: False
        if self.before:
            comfy_lora.LoraForward.__call__ = forward_before

    def __exit__(self, *exc):
        branch_dropout.fused_runs_on, comfy_lora.LoraForward.__call__ = self.saved


def pack_step(backend, z0, cond, spec, settings):
    backend.attach_lora(spec, torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(backend.lora_parameters(), lr=settings.learning_rate,
                                  weight_decay=settings.weight_decay)
    gen = torch.Generator().manual_seed(0)
    return lambda: queue_training_step(backend.denoise, optimizer, z0, cond, 0.7, settings, gen)


def graphed_step(backend, z0, cond, spec, settings):
    """pack_step through training_graph.CapturedStep: two eager warm-up calls, a capture, then replays."""
    backend.attach_lora(spec, torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(backend.lora_parameters(), lr=settings.learning_rate,
                                  weight_decay=settings.weight_decay, capturable=z0.is_cuda)
    gen = torch.Generator().manual_seed(0)
    captured = CapturedStep(lambda *i: step_on(backend.denoise, optimizer, z0, *i, settings.mixed_precision),
                            z0, cond, optimizer)

    def step():
        return captured(*draw_step_inputs(z0, cond, settings, gen), 0.7, edm_weight(0.7))
    step.captured, step.warmup = captured, WARMUP_STEPS + 1
    return step


def graph_against_eager(backend, z0, cond, settings, steps=6):
    """(largest relative loss difference, largest difference of the weight updates / the largest update) after
    `steps` steps from one adapter and one seed, eager against captured and replayed. SGD, not AdamW: AdamW's
    first updates are about lr x sign(gradient), so rounding that flips a near-zero gradient's sign moves that
    weight by 2 lr however close the gradients are; SGD's updates are the gradients themselves."""
    results = []
    for graphed in (False, True):
        torch.manual_seed(0)  # the dropout seeds are drawn from the device RNG
        backend.attach_lora(LoraSpec(), torch.Generator().manual_seed(0))
        start = torch.cat([p.detach().flatten() for p in backend.lora_parameters()])
        optimizer = torch.optim.SGD(backend.lora_parameters(), lr=settings.learning_rate)
        gen = torch.Generator().manual_seed(0)
        if graphed:
            captured = CapturedStep(lambda *i: step_on(backend.denoise, optimizer, z0, *i, settings.mixed_precision),
                                    z0, cond, optimizer)
            step = lambda: captured(*draw_step_inputs(z0, cond, settings, gen), 0.7, edm_weight(0.7))  # noqa: E731
        else:
            step = lambda: queue_training_step(backend.denoise, optimizer, z0, cond, 0.7, settings, gen)  # noqa: E731
        losses = [float(step()) for _ in range(steps)]
        update = torch.cat([p.detach().flatten() for p in backend.lora_parameters()]) - start
        if graphed:
            captured.release()
        backend.detach_lora()
        results.append((losses, update))
    (loss_e, u_e), (loss_g, u_g) = results
    loss_diff = max(abs(a - b) / abs(a) for a, b in zip(loss_e, loss_g))
    return loss_diff, float((u_e - u_g).abs().max() / u_e.abs().max())


def floor_step(model, size):
    """floors.comfy_floors' training step, on a fresh clone of `model`."""
    import comfy.model_management as mm

    (height, width), n, context = size["hw"], size["frames"], size["context"]
    lora = model.clone()
    params = floors._bare_lora(lora)
    mm.load_models_gpu([lora])
    base, device = lora.model, lora.load_device
    shape = (n, 4, height // 8, width // 8)
    adm = base.encode_adm(fps=6.0, motion_bucket_id=127.0, augmentation_level=0.02).to(device)
    x, sigma = torch.randn(shape, device=device), torch.full((n,), 0.7, device=device)
    c = dict(c_concat=torch.randn(shape, device=device), c_crossattn=torch.randn(n, 1, context, device=device),
             y=adm.repeat(n, 1), num_video_frames=n)
    target = torch.randn(shape, device=device)
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            v = base.apply_model(x, sigma, **c)
        floors._adamw_step((v.float() - target).pow(2).mean(), optimizer)
    step.patcher = lora  # load it again to run the step after another model ran
    return step


def time_variant(emit, name, step, steps, floor_ms):
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    wall, host = timed_steps(step, steps)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else float("nan")
    emit(f"| {name} | {wall * 1e3:.0f} | {wall * 1e3 / floor_ms:.2f} | {host * 1e3:.0f} | {peak:.1f} |")


def kernel_differences(emit, name, pack_k, floor_k, top):
    diff = sorted(set(floor_k) | set(pack_k), key=lambda k: -abs(pack_k.get(k, 0) - floor_k.get(k, 0)))
    emit(f"\n| kernel | {name} ms | floor ms | difference |\n|---|---|---|---|")
    for k in diff[:top]:
        emit(f"| `{k}` | {pack_k.get(k, 0):.1f} | {floor_k.get(k, 0):.1f} | {pack_k.get(k, 0) - floor_k.get(k, 0):+.1f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfyui", required=True)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--checkpointing", choices=("0", "3", "all"), default="0",
                        help="the pack's steps recompute 0 levels (fast tier), 3 (24gb) or all (12gb)")
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU (smoke run)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    def emit(text):
        print(text, flush=True)
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            with open(Path(args.out) / "step_profile.md", "a") as f:
                f.write(text + "\n")

    builders.setup_comfyui(args.comfyui, cpu=args.tiny)
    import comfy.model_management as mm

    size = TINY if args.tiny else FULL
    device_name = "CPU (tiny models)" if args.tiny else torch.cuda.get_device_name()
    emit(f"# {device_name}, torch {torch.__version__}: ComfyUI training step, pack vs floor")
    torch.manual_seed(0)
    if args.tiny:
        modules = builders.tiny_modules(full_vae=True)
        parts = builders.comfy_parts(modules, **builders.TINY_COMFY)
    else:
        modules = builders.diffusers_modules("cuda", size["frames"])
        parts = builders.comfy_parts(modules)
    for m in modules:
        m.to("cpu")
    del modules
    backend = builders.comfy_backend(parts)
    z0, cond = inputs(backend, size["frames"], size["hw"], size["context"])
    settings = TrainingSettings()

    steps = {"floor (bare LoRA)": floor_step(parts["model"], size)}
    floor_s, floor_host = timed_steps(steps["floor (bare LoRA)"], args.steps)
    floor_ms = floor_s * 1e3
    emit(f"\npack steps with checkpointing {args.checkpointing}; the floor never checkpoints\n\n"
         f"| step | ms | x floor | host ms | peak GiB |\n|---|---|---|---|---|\n"
         f"| floor (bare LoRA) | {floor_ms:.0f} | 1.00 | {floor_host * 1e3:.0f} | |")
    mm.load_models_gpu([backend.patcher])
    variants = (("pack", LoraSpec(), Variant()), ("pack, unfused dropout", LoraSpec(), Variant(fused=False)),
                ("pack, before", LoraSpec(), Variant(fused=False, before=True)),
                ("pack, dropout 0", LoraSpec(dropout=0.0), Variant()), ("pack, CUDA graph", LoraSpec(), Variant()))
    profiles = {}
    checkpointing = {"0": False, "3": 3, "all": True}[args.checkpointing]
    # Every timing first, the profiles after: a profiler session can slow the steps that follow it.
    for profiling in (False, True):
        if profiling:
            mm.load_models_gpu([steps["floor (bare LoRA)"].patcher])  # swaps the pack's patches for the floor's
            profiles["floor (bare LoRA)"] = profiled(steps["floor (bare LoRA)"])
            mm.load_models_gpu([backend.patcher])
        with torch.random.fork_rng(devices=[backend.device] if backend.device.type == "cuda" else []), \
                backend.lora_training(checkpointing):
            for name, spec, variant in variants:
                if profiling and name not in ("pack", "pack, before", "pack, CUDA graph"):
                    continue
                with variant:
                    make = graphed_step if name.endswith("CUDA graph") else pack_step
                    step = make(backend, z0, cond, spec, settings)
                    if profiling:
                        profiles[name] = profiled(step)
                    else:
                        time_variant(emit, name, step, args.steps, floor_ms)
                    if hasattr(step, "captured"):
                        step.captured.release()
                backend.detach_lora()
            if not profiling and torch.cuda.is_available():
                loss_diff, weight_diff = graph_against_eager(backend, z0, cond, settings)
                emit(f"\nCUDA graph against eager, 6 SGD steps from one adapter and seed: losses differ by at most "
                     f"{loss_diff:.2e} (relative), the LoRA weights' updates by {weight_diff:.2e} of the largest")

    emit("\n| profiled step | wall ms | GPU kernel ms | GPU waiting ms |\n|---|---|---|---|")
    for name, (wall, busy, _, _) in profiles.items():
        emit(f"| {name} | {wall:.0f} | {busy:.0f} | {wall - busy:.0f} |")
    for name in ("pack", "pack, before"):
        kernel_differences(emit, name, profiles[name][2], profiles["floor (bare LoRA)"][2], args.top)
    pack_k = profiles["pack"][2]
    emit("\n| pack's largest kernels | ms |\n|---|---|")
    for k in sorted(pack_k, key=lambda k: -pack_k[k])[:args.top]:
        emit(f"| `{k}` | {pack_k[k]:.1f} |")
    backend.release()


if __name__ == "__main__":
    main()
