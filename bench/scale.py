"""Scale runs of `bench/e2e.py --scale` (ComfyUI backend, default memory setting).

Peak memory against frames per clip (14, 25) and working size (576x1024, 768x1344): few steps
(3 inversion/edit steps, 2 training steps), since the peak of a stage does not depend on how many
steps it runs. A 2-clip video (27 frames, skip-interval on) with the full 25 inversion/edit steps and
`--scale-train-steps` training steps per clip, extrapolated to 250 by the per-step time; the time
per extra clip is its whole-video time minus the one-clip run's from the same process.
"""

import torch

from i2vedit_core.inversion import InversionSettings
from i2vedit_core.training import TrainingSettings

SHAPES = ((25, (576, 1024)), (14, (768, 1344)), (25, (768, 1344)))


def scale_runs(backend, records, args, out, emit, run_video, memory_settings, size):
    emit(out, "\n## comfy, default memory: peak GiB by stage against frames per clip and working size "
              "(3 inversion/edit steps, 2 training steps: peaks do not depend on step counts)\n")
    emit(out, "| frames | working size | inversion | training (at <= 512x896) | editing + decode | peak |")
    emit(out, "|---|---|---|---|---|---|")
    one = records.get("comfy-default", {}).get("mems")
    if one:
        emit(out, f"| 14 | 576x1024 | {one['invert']:.1f} | {one['train']:.1f} | {one['edit']:.1f} | "
                  f"{max(one.values()):.1f} |")
    for frames, hw in SHAPES:
        settings = memory_settings(None, training=TrainingSettings(steps=2), inversion=InversionSettings(steps=3),
                                   working_size=hw, clip_length=frames)
        try:
            _, mems, _ = run_video(backend, frames, hw, settings)
        except torch.cuda.OutOfMemoryError:
            emit(out, f"| {frames} | {hw[0]}x{hw[1]} | out of memory on the "
                      f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB card | | | |")
            torch.cuda.empty_cache()
            continue
        emit(out, f"| {frames} | {hw[0]}x{hw[1]} | {mems['invert']:.1f} | {mems['train']:.1f} | {mems['edit']:.1f} | "
                  f"{max(mems.values()):.1f} |")
    if not getattr(args, "no_two_clips", False):
        two_clips(backend, records, args, out, emit, run_video, memory_settings, size)


def two_clips(backend, records, args, out, emit, run_video, memory_settings, size):
    steps = args.scale_train_steps
    settings = memory_settings(None, training=TrainingSettings(steps=steps), inversion=InversionSettings(steps=25),
                               working_size=size["hw"], clip_length=14, skip_interval=True)
    rows, mems, _ = run_video(backend, 27, size["hw"], settings, size["train_steps"])
    one = records.get("comfy-default", {}).get("rows")
    emit(out, f"\n## comfy, 2 clips (27 frames, skip-interval on), default memory; training ran {steps} steps per "
              f"clip, extrapolated to {size['train_steps']} by its per-step time\n")
    emit(out, "| stage | 2 clips (s) | 1 clip (s) | extra clip (s) | peak GiB |")
    emit(out, "|---|---|---|---|---|")
    names = (("invert", "SARP + inversion"), ("train", "motion LoRA"), ("edit", "matched editing"),
             ("decode", "VAE decode"))
    for key, name in names:
        base = one[key] if one else float("nan")
        emit(out, f"| {name} | {rows[key]:.1f} | {base:.1f} | {rows[key] - base:.1f} | {mems[key]:.1f} |")
    total, base = sum(rows.values()), sum(one.values()) if one else float("nan")
    emit(out, f"| **whole video** | **{total:.1f}** | {base:.1f} | **{total - base:.1f}** | {max(mems.values()):.1f} |")
    records["comfy-2clips"] = dict(rows=rows, mems=mems)
