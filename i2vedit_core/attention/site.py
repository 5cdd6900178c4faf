"""Where an attention call happens: the host-free description every controller call receives.

A host (the diffusers processors, ComfyUI's patched attn1 forwards) builds one `AttentionSite`
per self-attention call. Tensors arrive head-split: q, k, v are (batch', heads, seq, head_dim) with
  spatial:  batch' = videos * frames, seq = tokens of one frame (rows of a video are contiguous);
  temporal: batch' = videos * tokens, seq = frames (keys may be longer: skip-interval).
"""

from dataclasses import dataclass
from typing import Optional, Tuple

ROLES = ("uncond", "cond", "source")
KINDS = ("spatial", "temporal")


@dataclass(frozen=True)
class BatchLayout:
    """What the videos of a batch are. rows: one role per video, in batch order (uncond first under CFG).

    frames: frames per video. tokens: spatial tokens per frame at this layer. grid: (h, w) of those
    tokens when the host knows it (needed only to turn difference maps into images).
    """
    rows: Tuple[str, ...]
    frames: int
    tokens: int
    grid: Optional[Tuple[int, int]] = None

    def __post_init__(self):
        unknown = [r for r in self.rows if r not in ROLES]
        if unknown:
            raise ValueError(f"unknown batch row roles {unknown}: use {ROLES}")
        if self.grid is not None and self.grid[0] * self.grid[1] != self.tokens:
            raise ValueError(f"grid {self.grid} does not hold {self.tokens} tokens")

    def indices(self, role: str) -> Tuple[int, ...]:
        return tuple(i for i, r in enumerate(self.rows) if r == role)


@dataclass(frozen=True)
class AttentionSite:
    """One self-attention module (kind, module path, downscale factor) at one call (layout)."""
    kind: str
    path: str
    downscale: int
    layout: Optional[BatchLayout] = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"site kind must be one of {KINDS}, got {self.kind!r}")

    @property
    def rows_per_video(self) -> int:
        """batch' rows of one video: frames for spatial sites, tokens for temporal ones."""
        return self.layout.frames if self.kind == "spatial" else self.layout.tokens

    def video_rows(self, index: int) -> slice:
        size = self.rows_per_video
        return slice(index * size, (index + 1) * size)
