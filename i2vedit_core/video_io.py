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
    """One RGB image as (3, H, W) in [-1, 1] (docs/RELIABILITY.md "Images"): EXIF orientation applied,
    16-bit scaled (not clipped), grey and palette expanded to RGB; an alpha channel is dropped where
    it is fully opaque and refused where it is not."""
    return torch.from_numpy(read_image_array(path)).permute(2, 0, 1) * 2 - 1


def read_mask(path, threshold: float = 0.5) -> torch.Tensor:
    """A mask image as (H, W) of 0/1: luminance (ITU-R 601 weights) >= threshold = 1 = may change."""
    rgb = read_image_array(path)
    luminance = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return torch.from_numpy((luminance >= threshold).astype(np.float32))


def read_image_array(path) -> np.ndarray:
    """(H, W, 3) float32 in [0, 1]. Every problem is a ValueError naming the file and the fix."""
    from PIL import Image, ImageOps, UnidentifiedImageError
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"image not found: {path}")
    try:
        with Image.open(path) as image:
            return _rgb_array(ImageOps.exif_transpose(image), path)
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"cannot read {path} as an image ({err}); use PNG or JPEG") from err


def _rgb_array(image, path) -> np.ndarray:
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):  # 16-bit grey (PNG, TIFF); "I" read as 16-bit
        grey = np.asarray(image, dtype=np.float32) / 65535
        return np.repeat(np.clip(grey, 0, 1)[..., None], 3, axis=-1)
    if image.mode == "F":
        grey = np.asarray(image, dtype=np.float32)
        if not (np.isfinite(grey).all() and grey.min() >= 0 and grey.max() <= 1):
            raise ValueError(f"{path} is a 32-bit float image with values outside [0, 1]: save it as 8- or 16-bit")
        return np.repeat(grey[..., None], 3, axis=-1)
    if image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255
        if rgba[..., 3].min() < 1:
            raise ValueError(f"{path} has transparent pixels: flatten it onto a background first "
                             "(or give the transparent area as --mask)")
        return rgba[..., :3].copy()
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255


def write_image(path, frame: torch.Tensor) -> Path:
    from PIL import Image
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_uint8(frame[None])[0]).save(path)
    return path


def from_uint8(array: np.ndarray) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (T, 3, H, W) float in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(array).astype(np.float32)).permute(0, 3, 1, 2) / 127.5 - 1


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """(T, 3, H, W) in [-1, 1] (or (T, 1, H, W) maps) -> (T, H, W, 3) uint8."""
    frames = frames.detach().float().cpu()
    if frames.shape[1] == 1:
        frames = frames.expand(-1, 3, -1, -1)
    return ((frames.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).contiguous().numpy()
