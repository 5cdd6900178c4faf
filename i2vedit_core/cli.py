"""Command line: `python -m i2vedit_core`.

Today it runs the plumbing demo (SARP + inversion + reconstruction on a tiny random-weight
SVD); editing a real video (`--video`, `--edited`, `--svd`) arrives with the pipeline.
"""

import argparse
import sys
import time
from typing import Optional, Sequence


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m i2vedit_core", description=__doc__.splitlines()[0])
    parser.add_argument("--svd", help="diffusers SVD folder or single-file .safetensors (editing: not yet available)")
    parser.add_argument("--video", help="input video to edit (not yet available)")
    parser.add_argument("--edited", nargs="+", help="edited first frame image(s) (not yet available)")
    parser.add_argument("--steps", type=int, default=25, help="inversion/denoising steps (default 25)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.svd or args.video or args.edited:
        print("i2vedit: editing a real video from the command line is not yet available "
              "(it lands with the edit_video pipeline). Run without arguments for the plumbing demo.",
              file=sys.stderr)
        return 2
    return run_plumbing_demo(args.steps, args.seed)


def run_plumbing_demo(steps: int, seed: int) -> int:
    import torch

    from .inversion import InversionSettings, invert_clip
    from .sampling import denoise
    from .schedule import denoising_sigmas
    from .tiny import synthetic_clip, tiny_backend

    print("i2vedit plumbing demo: a tiny RANDOM-WEIGHT SVD on a synthetic clip. This checks that the "
          "engine runs end to end on this machine; it is not an edit and its numbers say nothing about quality.")
    started = time.perf_counter()
    backend = tiny_backend(seed)
    frames = synthetic_clip(num_frames=6, seed=seed)
    inversion = invert_clip(backend, frames, InversionSettings(steps=steps, seed=seed),
                            callback=lambda info: _progress("invert", info["i"], steps))
    reconstructed = denoise(lambda x, sigma, step: backend.denoise(x, sigma, inversion.cond), inversion.noise,
                            denoising_sigmas(steps), callback=lambda info: _progress("denoise", info["i"], steps))
    error = float((reconstructed - inversion.latents[0]).pow(2).mean().sqrt())
    decoded = backend.decode(reconstructed[0])
    print(f"\nframes {tuple(frames.shape)} -> latents {tuple(inversion.latents.shape[2:])}, "
          f"{steps} inversion + {steps} denoising steps, decoded {tuple(decoded.shape)}")
    print(f"latent reconstruction RMS error {error:.4f} (random weights: expected to be far from 0), "
          f"{time.perf_counter() - started:.1f} s in all")
    return 0 if torch.isfinite(decoded).all() else 1


def _progress(stage: str, step: int, total: int) -> None:
    done = step + 1
    bar = "#" * (20 * done // total)
    print(f"\r{stage:8s} [{bar:<20s}] {done}/{total}", end="" if done < total else "\n", flush=True)
