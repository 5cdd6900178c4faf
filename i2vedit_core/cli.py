"""Command line: `python -m i2vedit_core`.

With `--svd` (a diffusers folder or an original single-file .safetensors), `--video` and
`--edited`, it edits a real video. With no `--svd` it runs the built-in synthetic sample on a tiny
random-weight model end to end: a plumbing demo that checks the installation, not an edit.
Writes one mp4 per edit, a difference-map PNG and a JSON report (settings, timings, metrics).
"""

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

PRESETS = ("local", "style", "shape")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m i2vedit_core", description=__doc__.splitlines()[2].strip())
    p.add_argument("--svd", help="SVD img2vid: a diffusers folder or an original single-file .safetensors")
    p.add_argument("--video", help="the source video (any format PyAV reads)")
    p.add_argument("--edited", nargs="+", help="edited first frame image(s); several = several edits")
    p.add_argument("--mask", help="optional mask image (white = may change, black = keep the source)")
    p.add_argument("--out", default="i2vedit_output", help="output folder (default ./i2vedit_output)")
    p.add_argument("--preset", choices=PRESETS, default="local", help="temporal attention preset")
    p.add_argument("--beta", type=float, nargs=2, metavar=("B1", "B2"), help="temporal stages (overrides preset)")
    p.add_argument("--thr", type=float, nargs=2, metavar=("FIRST", "LAST"), default=(0.35, 0.35),
                   help="spatial difference threshold at the first and last frame")
    p.add_argument("--guidance", type=float, nargs=2, metavar=("MIN", "MAX"), default=(1.0, 2.5))
    p.add_argument("--steps", type=int, default=25, help="inversion and denoising steps")
    p.add_argument("--train-steps", type=int, default=250, help="motion-LoRA steps per clip (0 = no LoRA)")
    p.add_argument("--frames-per-clip", type=int, default=14)
    p.add_argument("--overlap", type=int, default=1)
    p.add_argument("--size", type=int, nargs=2, metavar=("W", "H"), default=(1024, 576), help="working size")
    p.add_argument("--fit", choices=("resize", "pad"), default="resize")
    p.add_argument("--max-frames", type=int, help="read at most this many frames")
    p.add_argument("--stride", type=int, default=1, help="use every n-th frame of the video")
    p.add_argument("--fps", type=float, help="output frame rate (default: the input's)")
    p.add_argument("--memory", default="auto",
                   help="memory policy: auto (reads the GPU's free memory), fast, 24gb, 12gb, or a GiB budget "
                        "such as 16; lower settings checkpoint more of training, decode fewer frames at a time "
                        "and offload the VAE and CLIP (slower)")
    p.add_argument("--cache", help="cache folder for inversions and LoRAs (a second edit skips both)")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.svd is None:
            return run_demo(args)
        if not (args.video and args.edited):
            raise ValueError("--svd needs --video and --edited (the source video and its edited first frame)")
        return run_edit(args)
    except ValueError as err:
        print(f"i2vedit: {err}", file=sys.stderr)
        return 2


def settings_from(args, tiny: bool = False):
    from .attention import MatchSettings, TemporalSelector
    from .editing import EditSettings
    from .inversion import InversionSettings
    from .pipeline import PipelineSettings
    from .training import TrainingSettings

    temporal = TemporalSelector(*args.beta) if args.beta else TemporalSelector.preset(args.preset)
    training = TrainingSettings(steps=args.train_steps, seed=args.seed) if args.train_steps > 0 else None
    if tiny and training is not None:
        training = dataclasses.replace(training, max_pixels=64 * 64)
    return PipelineSettings(
        clip_length=args.frames_per_clip, overlap=args.overlap, working_size=(args.size[1], args.size[0]),
        fit=args.fit, inversion=InversionSettings(steps=args.steps, seed=args.seed), training=training,
        edit=EditSettings(matching=MatchSettings(thresholds=tuple(args.thr), temporal=temporal),
                          min_guidance=args.guidance[0], max_guidance=args.guidance[1], seed=args.seed),
        memory=args.memory)


def run_edit(args) -> int:
    from .backends.diffusers_loading import load_svd
    from .video_io import read_image, read_video

    frames, fps = read_video(args.video, args.max_frames, args.stride)
    edited = torch.stack([read_image(path) for path in args.edited])
    mask = (read_image(args.mask).mean(0) + 1) / 2 if args.mask else None
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    print(f"loading {args.svd} ...")
    backend = load_svd(args.svd, dtype=dtype)
    return run(backend, frames, edited, mask, settings_from(args), args, args.fps or fps,
               names=[Path(p).stem for p in args.edited], demo=False)


def run_demo(args) -> int:
    from .tiny import synthetic_clip, tiny_backend

    print("i2vedit plumbing demo: no --svd given, so a tiny RANDOM-WEIGHT SVD edits a synthetic 12-frame clip. "
          "This checks that the whole pipeline runs on this machine; the output is NOT an edit.")
    frames = synthetic_clip(12, 64, 64, seed=args.seed)
    edited = frames[0].clone()
    edited[:, 8:28, 36:60] = torch.tensor([0.9, 0.1, -0.6]).view(3, 1, 1)
    demo = argparse.Namespace(**dict(vars(args), size=(64, 64), frames_per_clip=6,
                                     steps=min(args.steps, 10), train_steps=min(args.train_steps, 10)))
    return run(tiny_backend(args.seed), frames, edited[None], None, settings_from(demo, tiny=True), demo,
               args.fps or 6.0, names=["demo_edit"], demo=True)


def run(backend, frames, edited, mask, settings, args, fps, names, demo: bool) -> int:
    from .cache import ArtifactCache
    from .metrics import video_report
    from .pipeline import edit_video
    from .video_io import write_image, write_video

    out = Path(args.out)
    cache = ArtifactCache(args.cache) if args.cache else None
    started = time.perf_counter()
    result = edit_video(backend, frames, edited, settings, progress=ProgressBar(), cache=cache, mask=mask)
    seams = [clip.start + settings.overlap for clip in result.clips[1:]]
    report = {"demo": demo, "note": "random weights: plumbing only, not an edit" if demo else "",
              "frames": list(frames.shape), "clips": [[c.start, c.stop] for c in result.clips],
              "settings": json.loads(json.dumps(dataclasses.asdict(settings), default=str)),
              "timings_s": {k: round(v, 3) for k, v in result.timings.items()},
              "total_s": round(time.perf_counter() - started, 3), "edits": {}}
    for name, edit, first in zip(names, result.edits, edited):
        video_path = write_video(out / f"{name}.mp4", edit.frames, fps)
        map_path = write_image(out / f"{name}_difference.png", _map_strip(edit.difference_map))
        metrics = video_report(frames, edit.frames, edited_first=first, seams=seams,
                               mask=None if mask is None else (mask > 0.5).float()[None, None])
        report["edits"][name] = {"video": str(video_path), "difference_map": str(map_path),
                                 "metrics": {k: (None if v is None else round(v, 5)) for k, v in metrics.items()}}
        print(f"wrote {video_path} and {map_path}")
    report_path = out / "report.json"
    report_path.write_text(json.dumps(report, indent=2))
    print(f"wrote {report_path} ({report['total_s']} s)")
    return 0


def _map_strip(maps: torch.Tensor, count: int = 4) -> torch.Tensor:
    """A few difference maps side by side, as one grey image in [-1, 1]."""
    picks = maps[torch.linspace(0, len(maps) - 1, min(count, len(maps))).long()]
    return torch.cat(list(picks), dim=-1).expand(3, -1, -1) * 2 - 1


class ProgressBar:
    """One terminal line per stage: stage, clip, step/total, loss."""

    def __call__(self, info: dict) -> None:
        step, total = info["step"], max(info["total"], 1)
        bar = "#" * (20 * step // total)
        loss = f" loss {info['loss']:.4f}" if "loss" in info else ""
        line = f"\r{info['stage']:7s} clip {info['clip'] + 1}/{info['clips']} [{bar:<20s}] {step}/{total}{loss}"
        print(line.ljust(72), end="\n" if step >= total else "", flush=True)
