"""Weight-free metrics of an edit next to the source's own values (CPU, tiny random-weight model).

    python bench/metrics.py

Runs the whole pipeline on the synthetic 20-frame clip (6-frame clips, overlap 1) with an edited
first frame and prints warp error, flicker, unedited-area PSNR/SSIM, first-frame PSNR and seam
colour drift for the output and for the source itself (the reference measured in the same run).
With random weights the numbers check the plumbing and the metric code, not edit quality; run the
CLI with a real SVD (`--svd`) for meaningful values (its report.json has the same table).
"""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from i2vedit_core.inversion import InversionSettings  # noqa: E402
from i2vedit_core.metrics import video_report  # noqa: E402
from i2vedit_core.pipeline import PipelineSettings, edit_video  # noqa: E402
from i2vedit_core.tiny import synthetic_clip, tiny_backend  # noqa: E402
from i2vedit_core.training import TrainingSettings  # noqa: E402


def main():
    torch.manual_seed(0)
    source = synthetic_clip(20, 64, 64)
    edited = source[0].clone()
    edited[:, 8:28, 36:60] = torch.tensor([0.9, 0.1, -0.6]).view(3, 1, 1)
    settings = PipelineSettings(clip_length=6, overlap=1, working_size=(64, 64),
                                inversion=InversionSettings(steps=10),
                                training=TrainingSettings(steps=10, max_pixels=64 * 64))
    started = time.perf_counter()
    result = edit_video(tiny_backend(0), source, edited[None], settings)
    seams = [clip.start + settings.overlap for clip in result.clips[1:]]
    report = video_report(source, result.edits[0].frames, edited_first=edited, seams=seams)
    print(f"# tiny random-weight SVD, 20 frames 64x64, clips {[(c.start, c.stop) for c in result.clips]}, "
          f"{time.perf_counter() - started:.1f} s")
    print("| metric | output | source |\n|---|---|---|")
    for name in ("warp_error", "flicker", "seam_colour_drift"):
        print(f"| {name} | {report[name]:.4f} | {report[name + '_source']:.4f} |")
    print(f"| psnr_unedited (dB) | {report['psnr_unedited']:.2f} | inf |")
    print(f"| ssim_unedited | {report['ssim_unedited']:.4f} | 1 |")
    print(f"| first_frame_psnr (dB) | {report['first_frame_psnr']:.2f} | inf |")


if __name__ == "__main__":
    main()
