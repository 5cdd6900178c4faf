"""Reading and writing videos and images for the command line (PyAV, Pillow). Frames: (T, 3, H, W) in [-1, 1]."""

from fractions import Fraction
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch


def read_video(path, max_frames: Optional[int] = None, stride: int = 1) -> Tuple[torch.Tensor, float]:
    """Decode frames (every `stride`-th, at most `max_frames`) and the frame rate they play at."""
    import av
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"video not found: {path}")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            fps = float(stream.average_rate or 8) / stride
            frames = []
            for index, frame in enumerate(container.decode(stream)):
                if index % stride == 0:
                    frames.append(frame.to_ndarray(format="rgb24"))
                if max_frames is not None and len(frames) >= max_frames:
                    break
    except (av.error.FFmpegError, IndexError) as err:
        raise ValueError(f"cannot read {path} as a video ({err}); convert it to mp4 (H.264) first") from err
    if len(frames) < 2:
        raise ValueError(f"{path} has {len(frames)} readable frame(s); a video edit needs at least 2")
    return from_uint8(np.stack(frames)), fps


def write_video(path, frames: torch.Tensor, fps: float) -> Path:
    """Encode frames as H.264 mp4 (yuv420p, so sizes are padded to even numbers by repeating the edge)."""
    import av
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = to_uint8(frames)
    pixels = np.pad(pixels, ((0, 0), (0, pixels.shape[1] % 2), (0, pixels.shape[2] % 2), (0, 0)), mode="edge")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        stream.height, stream.width = pixels.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "16"}
        for image in pixels:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    return path


def read_image(path) -> torch.Tensor:
    """One RGB image as (3, H, W) in [-1, 1]."""
    from PIL import Image, UnidentifiedImageError
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"image not found: {path}")
    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"cannot read {path} as an image ({err}); use PNG or JPEG") from err
    return from_uint8(array[None])[0]


def write_image(path, frame: torch.Tensor) -> Path:
    from PIL import Image
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_uint8(frame[None])[0]).save(path)
    return path


def from_uint8(array: np.ndarray) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (T, 3, H, W) float in [-1, 1]."""
    return torch.from_numpy(array).permute(0, 3, 1, 2).float() / 127.5 - 1


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """(T, 3, H, W) in [-1, 1] (or (T, 1, H, W) maps) -> (T, H, W, 3) uint8."""
    frames = frames.detach().float().cpu()
    if frames.shape[1] == 1:
        frames = frames.expand(-1, 3, -1, -1)
    return ((frames.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).contiguous().numpy()
