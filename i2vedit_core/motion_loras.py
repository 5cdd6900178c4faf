"""Train only the motion LoRAs of a video and save them as the series ComfyUI's Load Motion LoRA reads.

`python -m i2vedit_core.motion_loras --svd svd.safetensors --video input.mp4 --save ComfyUI/models/loras/i2vedit/my_video`
writes my_video_clip01of03.safetensors, ... (my_video.safetensors for one clip). Under torchrun
(`torchrun --standalone --nproc-per-node 4 -m i2vedit_core.motion_loras ...`) the clips are trained
on several GPUs; in ComfyUI, I2VEdit Load Motion LoRA then reads the series and the nodes invert and
edit on one GPU. The clip options (--frames-per-clip, --overlap, --size, --fit, --max-frames,
--stride) must be those of the I2VEdit Source Clips node the LoRAs are used with.
"""

import sys
from pathlib import Path
from typing import List, Optional, Sequence

def main(argv: Optional[Sequence[str]] = None) -> int:
    from .cli import ProgressLine, build_parser, settings_from

    parser = build_parser()  # the clip and training options of the editing command (edit options are unused)
    parser.prog, parser.description = "python -m i2vedit_core.motion_loras", __doc__.splitlines()[0]
    parser.add_argument("--save", metavar="PATH", help="series stem, e.g. ComfyUI/models/loras/i2vedit/my_video")
    args = parser.parse_args(argv)
    try:
        if not (args.svd and args.video and args.save):
            raise ValueError("--svd, --video and --save are needed (the model, the source video, where to save)")
        if args.train_steps < 1:
            raise ValueError("--train-steps must be at least 1: this command only trains motion LoRAs")
        return train_and_save(args, settings_from(args), ProgressLine())
    except ValueError as err:
        print(f"i2vedit: {err}", file=sys.stderr)
        return 2


def train_and_save(args, settings, progress) -> int:
    import torch

    from .backends.diffusers_loading import load_svd
    from .cache import ArtifactCache
    from .cli import device_of
    from .distributed import video_loras
    from .video_io import read_video

    frames, _ = read_video(args.video, args.max_frames, args.stride)
    device = device_of()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32,
             "auto": torch.float32 if device == "cpu" else torch.float16}[args.dtype]
    backend = load_svd(args.svd, dtype=dtype, device=device)
    loras = video_loras(backend, frames, settings, progress, cache=ArtifactCache(args.cache) if args.cache else None)
    if loras is None:  # a torchrun rank other than 0
        return 0
    for path in save_series(loras, Path(args.save)):
        print(f"wrote {path}")
    return 0


def save_series(loras, stem: Path) -> List[Path]:
    from .lora import save_motion_lora, series_names

    paths = [stem.parent / name for name in series_names(stem.name, len(loras))]
    existing = [p.name for p in paths if p.exists()]
    if existing:
        raise ValueError(f"{', '.join(existing)} already exist in {stem.parent}: choose another --save name")
    stem.parent.mkdir(parents=True, exist_ok=True)
    for lora, path in zip(loras, paths):
        save_motion_lora(lora, str(path))
    return paths


if __name__ == "__main__":
    from .distributed import run_under_torchrun
    raise SystemExit(run_under_torchrun(main))
