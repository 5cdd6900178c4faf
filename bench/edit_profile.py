"""Where matched editing's time goes, ComfyUI backend (fp16 as ComfyUI loads SVD, full size, random weights).

    python bench/edit_profile.py --comfyui /path/to/ComfyUI [--steps 5]

One edit of a 14-frame clip at 576x1024 through the core's `propagate` (source forward + CFG pair per step, the
matched attention, a rank-32 motion LoRA at scale 1), profiled, against the eager floor of the same steps: per step
one plain batch-1 and one plain batch-2 `apply_model` on a fresh clone of the MODEL (bench/floors.py), profiled the
same way. Per side: wall time, summed GPU kernel time and the GPU's idle share (wall - kernels: the host or a
synchronisation holds the GPU up), then the kernels and the host's operators whose time differs most. Decode is left
out (its own stage).
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import builders  # noqa: E402
import floors  # noqa: E402
from report import Report  # noqa: E402
from i2vedit_core.inversion import InversionSettings  # noqa: E402
from i2vedit_core.lora import LoraSpec  # noqa: E402
from i2vedit_core.pipeline import (PipelineSettings, check_edited_frames, invert_video, prepare_video,  # noqa: E402
                                   propagate)
from i2vedit_core.tiny import synthetic_clip  # noqa: E402
from step_profile import kernel_differences, profiled  # noqa: E402

FULL = dict(hw=(576, 1024), frames=14)
TINY = dict(hw=(64, 64), frames=4)


def edit_run(backend, size, steps):
    """A function running the pack's matched editing of one clip (no decode) for `steps` steps."""
    settings = PipelineSettings(inversion=InversionSettings(steps=steps), working_size=size["hw"],
                                clip_length=size["frames"])
    source = synthetic_clip(size["frames"], *size["hw"], seed=1)
    edited = source[0].clone()
    edited[:, :size["hw"][0] // 2] = 0.5
    video = prepare_video(source, settings)
    inversions = invert_video(backend, video, settings)
    backend.attach_lora(LoraSpec(rank=floors.RANK), torch.Generator().manual_seed(0))
    loras = [backend.export_lora()]
    edits = check_edited_frames(edited[None], video.fit)
    backend.decode = lambda latents, chunk_size=8: latents.new_zeros(len(latents), 3, *size["hw"])  # not timed here
    return lambda: propagate(backend, video, inversions, loras, edits, settings)


def floor_run(model, size, steps):
    """The floor's plain forwards of `steps` editing steps: b1 (source) + b2 (CFG) `apply_model` per step."""
    import comfy.model_management as mm

    fresh = model.clone()
    mm.load_models_gpu([fresh])
    device = torch.device(fresh.load_device)
    gen = torch.Generator(device).manual_seed(0)

    def call(batch):
        x, sigma, c = floors.comfy_inputs(fresh.model, device, batch, size["frames"], size["hw"], gen)
        return lambda: fresh.model.apply_model(x, sigma, **c)

    b1, b2 = call(1), call(2)

    def run():
        with torch.no_grad():
            for _ in range(steps):
                b1()
                b2()
    return run


def sync_sites(run, frames=4):
    """{(the Python lines that led to it): count} of every synchronising CUDA call in one run of `run`
    (torch.cuda.set_sync_debug_mode): each one makes the host wait for the GPU's whole queue, after which the GPU
    waits for the host."""
    import traceback
    import warnings
    from collections import Counter

    sites = Counter()
    if not torch.cuda.is_available():
        return sites

    def record(message, category, filename, lineno, file=None, line=None):
        stack = [f"{f.filename.split('/')[-1]}:{f.lineno}" for f in traceback.extract_stack()[:-2]
                 if "/torch/" not in f.filename and "warnings" not in f.filename]
        sites[" <- ".join(reversed(stack[-frames:]))] += 1

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():  # restores showwarning on exit
            warnings.simplefilter("always")
            warnings.showwarning = record
            run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sites


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfyui", required=True)
    parser.add_argument("--steps", type=int, default=5, help="editing steps profiled (the inversion's steps)")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU (smoke run)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    size = TINY if args.tiny else FULL
    emit = Report()
    parts = builders.comfy_profile_parts(args.comfyui, args.tiny, size["frames"])
    backend = builders.comfy_backend(parts)
    run = edit_run(backend, size, args.steps)
    run()  # warm-up: what the first call compiles or loads is not a per-step sync
    syncs = sync_sites(run)
    pack = profiled(run)
    backend.release()
    floor = profiled(floor_run(parts["model"], size, args.steps))
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    emit(f"# Matched editing, ComfyUI {parts['dtype']}, {size['frames']} frames at {size['hw'][0]}x{size['hw'][1]}, "
         f"{args.steps} steps ({name}, torch {torch.__version__})\n")
    emit("| run | wall ms / step | GPU kernels ms / step | GPU idle |\n|---|---|---|---|")
    for label, (wall, gpu, _, _) in (("pack: propagate (source + CFG pair, matched, LoRA)", pack),
                                  ("floor: plain b1 + b2 apply_model", floor)):
        emit(f"| {label} | {wall / args.steps:.0f} | {gpu / args.steps:.0f} | {1 - gpu / wall:.0%} |")
    kernel_differences(emit, "pack", pack[2], floor[2], args.top)
    emit("\nHost: CPU operators by self time (the host's share of a GPU-idle step)")
    kernel_differences(emit, "pack", pack[3], floor[3], args.top)
    emit(f"\nSynchronising CUDA calls in one edit of {args.steps} steps (torch.cuda.set_sync_debug_mode), by the "
         "Python lines that led to them (innermost first)\n\n| calls | where |\n|---|---|")
    for where, count in syncs.most_common(args.top):
        emit(f"| {count} | {where} |")
    emit.write(args.out, "edit_profile.md")


if __name__ == "__main__":
    main()
