"""Checking and normalising user frames before they reach any model.

The core's frame convention: float tensor (T, 3, H, W), values in [-1, 1]. Every check raises
a ValueError that names the fix, so a bad input never becomes a crash deep inside torch.
"""

from typing import Sequence, Union

import torch

SIZE_MULTIPLE = 64
RANGE_SLACK = 1e-3

FrameInput = Union[torch.Tensor, Sequence[torch.Tensor]]


def as_frame_batch(frames: FrameInput, name: str = "frames", min_frames: int = 1,
                   size_multiple: int = SIZE_MULTIPLE) -> torch.Tensor:
    """Validate frames and return them as one float32 (T, 3, H, W) tensor in [-1, 1].

    size_multiple: what H and W must be multiples of (1 where a working-size fit follows).
    """
    batch = _stack(frames, name)
    if batch.ndim != 4 or batch.shape[1] != 3:
        raise ValueError(f"{name} must have shape (T, 3, H, W) (RGB, channels first); got {tuple(batch.shape)}")
    if batch.shape[0] < min_frames:
        raise ValueError(f"{name} needs at least {min_frames} frames, got {batch.shape[0]}")
    check_size(batch.shape[-2], batch.shape[-1], name, size_multiple)
    batch = batch.float()
    if not bool(torch.isfinite(batch).all()):
        raise ValueError(f"{name} contain NaN or infinite values; check the node or file that produced them")
    lo, hi = float(batch.min()), float(batch.max())
    if lo < -1 - RANGE_SLACK or hi > 1 + RANGE_SLACK:
        raise ValueError(f"{name} must be in [-1, 1], got values in [{lo:.3g}, {hi:.3g}]; "
                         "convert images in [0, 1] with x * 2 - 1")
    return batch.clamp(-1, 1)


def check_size(height: int, width: int, name: str = "frames", multiple: int = SIZE_MULTIPLE) -> None:
    if height == 0 or width == 0:
        raise ValueError(f"{name} are empty images ({width}x{height})")
    if height % multiple or width % multiple:
        raise ValueError(f"{name} are {width}x{height}; SVD needs width and height that are multiples of "
                         f"{multiple}: resize or pad them first (e.g. to 1024x576)")


def _stack(frames: FrameInput, name: str) -> torch.Tensor:
    if isinstance(frames, torch.Tensor):
        return frames
    if not isinstance(frames, Sequence) or isinstance(frames, (str, bytes)):
        raise ValueError(f"{name} must be a tensor or a list of tensors, got {type(frames).__name__}")
    if len(frames) == 0:
        raise ValueError(f"{name} is empty: pass at least one frame")
    if not all(isinstance(f, torch.Tensor) for f in frames):
        raise ValueError(f"{name} must be a list of tensors")
    shapes = {tuple(f.shape) for f in frames}
    if len(shapes) > 1:
        raise ValueError(f"{name} have mixed sizes {sorted(shapes)}; resize them all to one size first")
    return torch.stack(list(frames))
