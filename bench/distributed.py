"""A video of N clips fanned out over G GPUs (issue 14): rank 0 prints the wall time per stage.

    torchrun --standalone --nproc-per-node G bench/distributed.py --full [--clips 4] [--train-steps 250]
    torchrun --standalone --nproc-per-node 2 bench/distributed.py --gloo     # functional, GPUs may be shared

G = 1 runs the single-process path (the baseline); scaling efficiency = time(1) / (G x time(G)).
--full: full-size random-weight SVD at 576x1024, 14 frames per clip (needs one H100/H200 per rank).
Without --full: the tiny random model on 64x64 frames, a functional check; rank 0 then also runs the
single-process stages itself and prints the largest difference from the fanned-out result (0 when
the ranks' kernels round alike). --gloo: gloo instead of NCCL, so that several ranks can share one GPU.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from i2vedit_core.inversion import InversionSettings  # noqa: E402
from i2vedit_core.pipeline import (PipelineSettings, check_edited_frames, edit_video, invert_video, memory_plan,  # noqa: E402
                                   prepare_video, propagate, train_loras, with_plan)
from i2vedit_core.tiny import synthetic_clip, tiny_backend  # noqa: E402
from i2vedit_core.training import TrainingSettings  # noqa: E402


def settings_for(args) -> PipelineSettings:
    if args.full:
        return PipelineSettings(inversion=InversionSettings(steps=args.steps),
                                training=TrainingSettings(steps=args.train_steps))
    return PipelineSettings(clip_length=4, overlap=1, working_size=(64, 64), inversion=InversionSettings(steps=2),
                            training=TrainingSettings(steps=2, max_pixels=64 * 64))


def inputs(args, settings: PipelineSettings):
    height, width = settings.working_size
    stride = settings.clip_length - settings.overlap
    video = synthetic_clip(stride * args.clips + settings.overlap, height, width)
    edited = video[0].clone()
    edited[:, height // 8:height // 3, width // 2:width - width // 8] = torch.tensor([0.9, 0.1, -0.6]).view(3, 1, 1)
    return video, edited[None]


def single_process(backend, video, edited, settings):
    """edit_video's single-process stages, called directly (the process group is up here)."""
    prepared = prepare_video(video, settings)
    inversions = invert_video(backend, prepared, settings)
    loras = train_loras(backend, prepared, settings)
    return propagate(backend, prepared, inversions, loras, check_edited_frames(edited, prepared.fit), settings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--gloo", action="store_true")
    parser.add_argument("--clips", type=int, default=4)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--train-steps", type=int, default=250)
    args = parser.parse_args()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    dist.init_process_group("gloo" if args.gloo or not cuda else "nccl")
    device = "cuda" if cuda else "cpu"
    if args.full:
        from e2e import full_size_backend
        backend = full_size_backend()
    else:
        backend = tiny_backend(0, device=device)
    settings = settings_for(args)
    video, edited = inputs(args, settings)
    started = time.perf_counter()
    result = edit_video(backend, video, edited, settings)
    wall = time.perf_counter() - started
    if dist.get_rank() == 0:
        report = {"ranks": dist.get_world_size(), "backend": dist.get_backend(), "clips": len(result.clips),
                  "device": torch.cuda.get_device_name() if cuda else "cpu", "full_size": args.full,
                  "wall_s": round(wall, 2), "timings_s": {k: round(v, 2) for k, v in result.timings.items()}}
        if not args.full:
            reference = single_process(backend, video, edited, with_plan(settings, memory_plan(backend, settings)))[0].frames
            report["max_abs_diff_vs_single_process"] = float((reference - result.edits[0].frames).abs().max())
        print(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
