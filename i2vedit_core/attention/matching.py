"""Spatial attention matching of the edit's conditional rows against the source (ALGORITHM §5).

out = (1 - M)·softmax(q_src k_srcᵀ/√d)·v + M·softmax(q kᵀ/√d)·v, M = 1 where d >= thr(frame) else d.
Both terms are fused attention calls (M is per query row, so it factors out of the key sum);
only d needs a custom reduction (distance.py). No N×N map is ever held.
"""

from typing import Optional, Sequence, Tuple

import torch

from .distance import DEFAULT_BUDGET, row_distance
from .fused import attention_with_lse

DEFAULT_THRESHOLDS = (0.35, 0.35)


def check_thresholds(thresholds: Sequence[float]) -> Tuple[float, float]:
    if len(thresholds) != 2 or not all(0.0 <= float(t) <= 1.0 for t in thresholds):
        raise ValueError(f"mask thresholds must be two values [first frame, last frame] in [0, 1], got "
                         f"{list(thresholds)}")
    return float(thresholds[0]), float(thresholds[1])


def threshold_ramp(thresholds: Sequence[float], frames: int, device=None, official: bool = False) -> torch.Tensor:
    """thr(f) linear from thresholds[0] (frame 0) to thresholds[1] (last frame), shape (F,).

    official: thr0 + (thr1 - thr0)·f/F as the official code ramps, never reaching thr1 (with its
    equal defaults both agree).
    """
    first, last = check_thresholds(thresholds)
    if official:
        return first + (last - first) * torch.arange(frames, dtype=torch.float32, device=device) / frames
    return torch.linspace(first, last, frames, dtype=torch.float32, device=device)


def difference_mask(d: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """M (F, N): 1 where d >= thr(f) (the official code's >=), else d itself."""
    return torch.where(d >= thresholds[:, None], torch.ones_like(d), d)


def matched_attention(q_src: torch.Tensor, k_src: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                      v: torch.Tensor, thresholds: torch.Tensor, budget: int = DEFAULT_BUDGET,
                      use_triton: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out, M) for one video: q, k, v (F, H, N, D) of the edit, q_src, k_src of the source; M is (F, N)."""
    want_lse = use_triton and _triton_ready(q)
    src_out, lse_src = attention_with_lse(q_src, k_src, v, want_lse)
    edit_out, lse = attention_with_lse(q, k, v, want_lse)
    if lse_src is not None and lse is not None:
        from . import triton_distance
        d = triton_distance.row_distance(q_src, k_src, q, k, lse_src, lse)
    else:
        d = row_distance(q_src, k_src, q, k, budget, use_triton)
    mask = difference_mask(d, thresholds.to(d.device))
    return torch.lerp(src_out, edit_out, mask[:, None, :, None].to(v.dtype)), mask


def _triton_ready(q) -> bool:
    from . import triton_distance
    return q.is_cuda and triton_distance.supports(q)
