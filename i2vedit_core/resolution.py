"""Working resolution: fit any video to sizes SVD accepts (multiples of 64) and back, never stretching.

Two policies, both preserving the aspect ratio:
- "pad": the working size is exactly `target`; the frame is scaled to fit inside it and the
  border is filled by repeating edge pixels (letterbox).
- "resize": the working size is chosen from the source aspect ratio with about the pixel count of
  `target` (rounded to multiples of 64); the few rounding pixels are padded the same way.
The output is cropped back to the content box and resized to the source size.
"""

import math
from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn.functional as F

from .frames import SIZE_MULTIPLE

FIT_MODES = ("pad", "resize")


@dataclass(frozen=True)
class Fit:
    source_hw: Tuple[int, int]
    working_hw: Tuple[int, int]
    content_box: Tuple[int, int, int, int]  # top, left, height, width of the scaled frame inside the working frame


def plan_fit(source_hw: Tuple[int, int], target_hw: Tuple[int, int] = (576, 1024), mode: str = "resize") -> Fit:
    if mode not in FIT_MODES:
        raise ValueError(f"fit mode must be one of {FIT_MODES}, got {mode!r}")
    (h, w), (th, tw) = source_hw, target_hw
    if min(h, w, th, tw) <= 0:
        raise ValueError(f"sizes must be positive, got source {source_hw} and target {target_hw}")
    if th % SIZE_MULTIPLE or tw % SIZE_MULTIPLE:
        raise ValueError(f"the working size {tw}x{th} must be multiples of {SIZE_MULTIPLE} (e.g. 1024x576)")
    if mode == "resize":
        scale = math.sqrt(th * tw / (h * w))
        th = max(SIZE_MULTIPLE, round(h * scale / SIZE_MULTIPLE) * SIZE_MULTIPLE)
        tw = max(SIZE_MULTIPLE, round(w * scale / SIZE_MULTIPLE) * SIZE_MULTIPLE)
    scale = min(th / h, tw / w)
    ch, cw = min(th, round(h * scale)), min(tw, round(w * scale))
    return Fit((h, w), (th, tw), ((th - ch) // 2, (tw - cw) // 2, ch, cw))


def to_working(frames: torch.Tensor, fit: Fit) -> torch.Tensor:
    """(T, 3, h, w) source-size frames -> (T, 3, H, W) working-size frames."""
    top, left, ch, cw = fit.content_box
    th, tw = fit.working_hw
    content = _resize(frames, (ch, cw))
    return F.pad(content, (left, tw - cw - left, top, th - ch - top), mode="replicate")


def from_working(frames: torch.Tensor, fit: Fit) -> torch.Tensor:
    """(T, 3, H, W) working-size frames -> (T, 3, h, w) at the source size (border removed)."""
    top, left, ch, cw = fit.content_box
    return _resize(frames[..., top:top + ch, left:left + cw], fit.source_hw)


def _resize(frames: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    if tuple(frames.shape[-2:]) == tuple(size):
        return frames
    return F.interpolate(frames.float(), size=size, mode="bicubic", align_corners=False, antialias=True).clamp(-1, 1)
