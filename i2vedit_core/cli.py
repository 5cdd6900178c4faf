"""Command line: `python -m i2vedit_core`.

Edits a video by editing only its first frame: give the source video (--video), frame 0 edited in any
image tool (--edited; several files = several edits) and an SVD image-to-video model (--svd: a
diffusers folder or an original single-file .safetensors). The edit is carried through the whole
video with the source's motion; with --mask, black areas keep the source exactly.

With no --svd it runs a built-in synthetic sample on a tiny random-weight model end to end: a
plumbing demo that checks the installation, not an edit.

Writes into --out: <edited file name>.mp4 per edit, <name>_difference.png (where the edit departed
from the source) and report.json (settings, timings, metrics). Every input and setting is checked
before the model loads, and all problems are reported at once; an existing output is replaced only
with --overwrite, an input never; outputs appear only when the whole run succeeded.
Exit codes: 0 done, 2 bad input or setting, 130 interrupted (Ctrl-C).
"""

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from .presets import NUMERICS
from .validation import CLI, NAME, InvalidInput, Problems, check_inputs, check_settings

PRESETS = ("local", "style", "shape")
OUTPUT_SUFFIXES = (".mp4", "_difference.png")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description as written, and each flag's default where it has one."""

    def _get_help_string(self, action):
        if action.default in (None, False) or isinstance(action, argparse._HelpAction):
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, as for every other bad input
        self.exit(2, f"i2vedit: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m i2vedit_core", description=__doc__, formatter_class=HelpFormatter)
    a = p.add_argument
    a("--svd", help="SVD img2vid model: a diffusers folder (unet/, vae/, image_encoder/) or an original single-file "
                    ".safetensors; without it the plumbing demo runs")
    a("--video", help="the source video (any format PyAV reads: mp4, mov, webm, ...)")
    a("--edited", nargs="+", metavar="IMAGE", help="frame 0 of the video edited in any tool, at the video's size; "
                                                   "several images = several edits (output names from file names)")
    a("--mask", help="mask image at the video's size: white = may change, black = keep the source exactly")
    a("--mask-threshold", type=float, default=0.5,
      help="mask pixels with luminance (0-1) at or above this are white (may change), the rest black")
    a("--out", default="i2vedit_output", help="output folder")
    a("--overwrite", action="store_true", help="replace outputs that already exist (inputs are never replaced)")
    a("--preset", choices=PRESETS, default="local",
      help="how long the edit follows the source's temporal attention: local = object edits, style = restyling, "
           "shape = edits that change shape")
    a("--beta", type=float, nargs=2, metavar=("B1", "B2"),
      help="temporal attention stages as fractions of the steps, 0 <= B1 <= B2 <= 1 (overrides --preset)")
    a("--numerics", choices=NUMERICS, default="default",
      help="official: the official code's numerical choices where they differ from ours (docs/FIDELITY.md)")
    a("--thr", type=float, nargs=2, metavar=("FIRST", "LAST"), default=(0.35, 0.35),
      help="spatial matching threshold in [0, 1] at the first and last frame of a clip (higher keeps more source)")
    a("--guidance", type=float, nargs=2, metavar=("MIN", "MAX"), default=(1.0, 2.5),
      help="classifier-free guidance at the first and last frame of a clip (each >= 1)")
    a("--steps", type=int, default=25, help="inversion and denoising steps")
    a("--train-steps", type=int, default=250, help="motion-LoRA training steps per clip (0 = no motion LoRA)")
    a("--frames-per-clip", type=int, default=14, help="frames SVD makes at once (14 for svd, 25 for svd_xt)")
    a("--overlap", type=int, default=1, help="frames shared by consecutive clips")
    a("--size", type=int, nargs=2, metavar=("W", "H"), default=(1024, 576),
      help="working size, multiples of 64 (the output keeps the video's own size)")
    a("--fit", choices=("resize", "pad"), default="resize",
      help="resize: about W*H pixels at the video's aspect ratio; pad: exactly W x H, letterboxed")
    a("--max-frames", type=int, help="read at most this many frames (after --stride)")
    a("--stride", type=int, default=1, help="use every n-th frame of the video")
    a("--fps", type=float, help="output frame rate (default: the input's, divided by --stride)")
    a("--memory", default="auto",
      help="memory policy: auto (from the GPU's free memory), fast, 24gb, 12gb, or a GiB budget such as 16; lower "
           "settings checkpoint more of training, decode fewer frames at a time and offload the VAE and CLIP")
    a("--compile-training", action=argparse.BooleanOptionalAction, default=None,
      help="torch.compile the UNet for motion-LoRA training (CUDA with Triton only; default: the memory "
           "setting decides): a one-off compile per process, then each training step about a third faster "
           "(docs/PERFORMANCE.md)")
    a("--cuda-graph", action=argparse.BooleanOptionalAction, default=True,
      help="replay the motion-LoRA training step as one captured CUDA graph where it can be (default on; "
           "--no-cuda-graph queues every step eagerly)")
    a("--cache", help="folder caching inversions and motion LoRAs: a second edit of the same video skips both")
    a("--dtype", choices=("auto", "fp16", "bf16", "fp32"), default="auto",
      help="model precision; auto = fp32 on CPU (fp16 is about 2x slower there), fp16 on CUDA")
    a("--seed", type=int, default=0, help="seed of every random draw")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_edit(args) if args.svd is not None else run_demo(args)
    except ValueError as err:  # InvalidInput, and input errors found while loading
        print(f"i2vedit: error: {err if isinstance(err, InvalidInput) else CLI.render('', str(err))}",
              file=sys.stderr)
        return 2
    except torch.cuda.OutOfMemoryError as err:
        print(f"i2vedit: error: {CLI.render('', str(err).splitlines()[0])}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ni2vedit: interrupted; no output was written", file=sys.stderr)
        return 130
    except OSError as err:  # writing the outputs (disk full, folder removed meanwhile)
        print(f"i2vedit: error: could not write to --out {args.out} ({err}); no output was written",
              file=sys.stderr)
        return 1


def device_of() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_args(problems: Problems, args) -> None:
    """The flags' own values (settings, reading, output); files are read by the caller."""
    check_settings(problems, clip_length=args.frames_per_clip, overlap=args.overlap, working_size=args.size[::-1],
                   fit=args.fit, inversion_steps=args.steps,
                   training_steps=args.train_steps if args.train_steps != 0 else None, guidance=args.guidance,
                   thresholds=args.thr, betas=args.beta)
    if args.max_frames is not None and args.max_frames < 2:
        problems.add("max_frames", f"{NAME} must be at least 2 (a video edit needs 2 frames), got {args.max_frames}")
    if args.stride < 1:
        problems.add("stride", f"{NAME} must be at least 1, got {args.stride}")
    if args.fps is not None and not (0 < args.fps < float("inf")):
        problems.add("fps", f"{NAME} must be a positive frame rate, got {args.fps}")
    if not 0 < args.mask_threshold <= 1:
        problems.add("mask_threshold", f"{NAME} must be in (0, 1], got {args.mask_threshold}")
    if args.cache is not None:
        from .files import writable_place
        why = writable_place(args.cache)
        if why:
            problems.add("cache", f"{NAME} {args.cache}: {why}; choose another folder or leave --cache out")


def check_outputs(problems: Problems, args, names: Sequence[str], inputs: Sequence[str]) -> None:
    """--out writable; no output over an input (even with --overwrite) or over an existing file (without it)."""
    from .files import writable_place
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        problems.add("out", f"{NAME} {out} is a file: give a folder")
        return
    why = writable_place(out)
    if why:
        problems.add("out", f"{NAME} {out}: {why}; choose another folder")
        return
    for name in sorted({n for n in names if list(names).count(n) > 1}):
        problems.add("edited_first_frames", f"{NAME}: two files are named {name!r}, so their outputs would collide: "
                                            "rename one")
    existing = [p for p in output_paths(out, names) if p.exists()]
    readable = [Path(p) for p in inputs if p and Path(p).exists()]
    for path in existing:
        same = next((i for i in readable if path.samefile(i)), None)
        if same is not None:
            problems.add("out", f"{NAME} {out} would write {path.name} over the input {same}: choose another "
                                "--out (inputs are never replaced, not even with --overwrite)")
        elif not args.overwrite:
            problems.add("out", f"{path} already exists: pass --overwrite to replace it or choose another --out")


def output_paths(out: Path, names: Sequence[str]):
    return [out / f"{name}{suffix}" for name in names for suffix in OUTPUT_SUFFIXES] + [out / "report.json"]


def read_inputs(problems: Problems, args):
    """Video, edited frames and mask, each problem filed under its flag. -> (frames, fps, edited, mask)."""
    from .video_io import read_image, read_mask, read_video
    video = problems.attempt("frames", read_video, args.video, args.max_frames, max(args.stride, 1))
    edited = [problems.attempt("edited_first_frames", read_image, path) for path in args.edited]
    mask = problems.attempt("mask", read_mask, args.mask, args.mask_threshold) if args.mask else None
    frames, fps = video if video is not None else (None, None)
    return frames, fps, None if None in edited else edited, mask


def run_edit(args) -> int:
    from .backends import diffusers_loading
    from .backends.svd_files import svd_path_problems

    problems = Problems(CLI)
    if not (args.video and args.edited):
        problems.add("svd", "--svd needs --video and --edited (the source video and its edited first frame)")
        problems.raise_if_any()
    check_args(problems, args)
    for problem in svd_path_problems(args.svd):
        problems.add("svd", problem)
    frames, fps, edited, mask = read_inputs(problems, args)
    names = [Path(p).stem for p in args.edited]
    check_outputs(problems, args, names, [args.video, *args.edited, args.mask, args.svd, args.cache])
    settings = None if problems.items else settings_from(args)
    if frames is not None:
        check_inputs(frames, edited, mask, settings, device_of(), CLI, problems)
    problems.raise_if_any()
    device = device_of()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32,
             "auto": torch.float32 if device == "cpu" else torch.float16}[args.dtype]
    print(f"loading {args.svd} ({str(dtype).removeprefix('torch.')} on {device}) ...", flush=True)
    try:
        backend = diffusers_loading.load_svd(args.svd, dtype=dtype, device=device)
    except (OSError, KeyError, TypeError) as err:
        raise ValueError(f"--svd {args.svd} could not be loaded ({err}): check the files or download them again") \
            from err
    return run(backend, frames, torch.stack(edited), mask, settings, args, args.fps or fps, names, demo=False)


def run_demo(args) -> int:
    from .tiny import synthetic_clip, tiny_backend

    problems = Problems(CLI)
    given = [flag for flag in ("video", "edited", "mask") if getattr(args, flag)]
    if given:
        problems.add("svd", f"--{'/--'.join(given)} need(s) --svd (the SVD model); without --svd the built-in "
                            "plumbing demo runs")
    check_args(problems, args)
    check_outputs(problems, args, ["demo_edit"], [])
    problems.raise_if_any()
    print("i2vedit plumbing demo: no --svd given, so a tiny RANDOM-WEIGHT SVD edits a synthetic 12-frame clip. "
          "This checks that the whole pipeline runs on this machine; the output is NOT an edit.")
    frames = synthetic_clip(12, 64, 64, seed=args.seed)
    edited = frames[0].clone()
    edited[:, 8:28, 36:60] = torch.tensor([0.9, 0.1, -0.6]).view(3, 1, 1)
    demo = argparse.Namespace(**dict(vars(args), size=(64, 64), frames_per_clip=6, overlap=1,
                                     steps=min(args.steps, 10), train_steps=min(args.train_steps, 10)))
    return run(tiny_backend(args.seed), frames, edited[None], None, settings_from(demo, tiny=True), demo,
               args.fps or 6.0, names=["demo_edit"], demo=True)


def settings_from(args, tiny: bool = False):
    from .attention import MatchSettings, TemporalSelector
    from .editing import EditSettings
    from .inversion import InversionSettings
    from .pipeline import PipelineSettings
    from .presets import with_numerics
    from .training import TrainingSettings

    temporal = TemporalSelector(*args.beta) if args.beta else TemporalSelector.preset(args.preset)
    training = (TrainingSettings(steps=args.train_steps, seed=args.seed, compile=args.compile_training,
                                 cuda_graph=args.cuda_graph)
                if args.train_steps > 0 else None)
    if tiny and training is not None:
        training = dataclasses.replace(training, max_pixels=64 * 64)
    settings = PipelineSettings(
        clip_length=args.frames_per_clip, overlap=args.overlap, working_size=(args.size[1], args.size[0]),
        fit=args.fit, inversion=InversionSettings(steps=args.steps, seed=args.seed), training=training,
        edit=EditSettings(matching=MatchSettings(thresholds=tuple(args.thr), temporal=temporal),
                          min_guidance=args.guidance[0], max_guidance=args.guidance[1], seed=args.seed),
        memory=args.memory)
    return with_numerics(settings, args.numerics)


def run(backend, frames, edited, mask, settings, args, fps, names, demo: bool) -> int:
    from .cache import ArtifactCache
    from .distributed import rank
    from .files import StagedFiles
    from .metrics import video_report
    from .pipeline import edit_video
    from .video_io import write_image, write_video

    out = Path(args.out)
    cache = ArtifactCache(args.cache) if args.cache else None
    started = time.perf_counter()
    result = edit_video(backend, frames, edited, settings, progress=ProgressLine(), cache=cache, mask=mask)
    if rank() != 0:  # a torchrun rank other than 0 worked on clips; rank 0 writes the outputs
        return 0
    for note in getattr(result, "notes", ()):
        print(f"note: {note}")
    seams = [clip.start + settings.overlap for clip in result.clips[1:]]
    report = {"demo": demo, "note": "random weights: plumbing only, not an edit" if demo else "",
              "frames": list(frames.shape), "clips": [[c.start, c.stop] for c in result.clips],
              "settings": json.loads(json.dumps(dataclasses.asdict(settings), default=str)),
              "timings_s": {k: round(v, 3) for k, v in result.timings.items()},
              "total_s": round(time.perf_counter() - started, 3), "edits": {}}
    created = not out.exists()
    try:
        with StagedFiles(overwrite=args.overwrite) as staged:
            for name, edit, first in zip(names, result.edits, edited):
                video_path, map_path = out / f"{name}.mp4", out / f"{name}_difference.png"
                write_video(staged.stage(video_path), edit.frames, fps)
                write_image(staged.stage(map_path), _map_strip(edit.difference_map))
                metrics = video_report(frames, edit.frames, edited_first=first, seams=seams,
                                       mask=None if mask is None else (mask > 0.5).float()[None, None])
                report["edits"][name] = {"video": str(video_path), "difference_map": str(map_path), "metrics": {
                    k: (None if v is None else round(v, 5)) for k, v in metrics.items()}}
            staged.stage(out / "report.json").write_text(json.dumps(report, indent=2))
            written = staged.commit()
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a folder this run made and could not fill
        raise
    print("wrote " + ", ".join(str(p) for p in written) + f" ({report['total_s']} s)")
    return 0


def _map_strip(maps: torch.Tensor, count: int = 4) -> torch.Tensor:
    """A few difference maps side by side, as one grey image in [-1, 1]."""
    picks = maps[torch.linspace(0, len(maps) - 1, min(count, len(maps))).long()]
    return torch.cat(list(picks), dim=-1).expand(3, -1, -1) * 2 - 1


class ProgressLine:
    """One terminal line per stage and clip: step/total, loss, time elapsed since the start and the
    stage's ETA (from the seconds per step seen so far in this clip of the stage)."""

    def __init__(self, stream=None, clock=time.perf_counter):
        self.stream, self.clock = stream, clock
        self.started = clock()
        self.stage_key, self.stage_started = None, self.started

    def __call__(self, info: dict) -> None:
        now = self.clock()
        if (info["stage"], info["clip"]) != self.stage_key:
            self.stage_key, self.stage_started = (info["stage"], info["clip"]), now
        step, total, clip, clips = info["step"], max(info["total"], 1), info["clip"], info["clips"]
        remaining = (clips - clip) * total - step
        eta = (now - self.stage_started) / step * remaining if step > 0 else None
        loss = f" loss {info['loss']:.4f}" if "loss" in info else ""
        line = (f"\r{info['stage']:7s} clip {clip + 1}/{clips} [{'#' * (20 * step // total):<20s}] {step}/{total}"
                f"{loss}  elapsed {_clock(now - self.started)}  ETA {'--:--' if eta is None else _clock(eta)}")
        print(line.ljust(80), end="\n" if step >= total else "", flush=True, file=self.stream or sys.stdout)


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}" if minutes >= 60 else f"{minutes}:{seconds:02d}"
