"""Difference maps M for previews: per spatial layer, averaged over steps, and over layers."""

from typing import Dict, Tuple

import torch
import torch.nn.functional as F


class DifferenceMaps:
    """Running mean over denoising steps of each layer's M, (videos, F, h, w) float32: summed where M is, moved to
    the CPU when read. A copy to the CPU at each matched layer made the host wait for the GPU there, and the GPU
    then waited for the host's next kernels (docs/PERFORMANCE.md, run 9: 12 % of an editing step idle)."""

    def __init__(self):
        self._sums: Dict[str, torch.Tensor] = {}
        self._counts: Dict[str, int] = {}

    def add(self, path: str, grid: Tuple[int, int], mask: torch.Tensor) -> None:
        """mask: (videos, F, N) with N = h * w."""
        image = mask.detach().float().reshape(*mask.shape[:2], *grid)
        self._sums[path] = self._sums[path] + image if path in self._sums else image.clone()  # M may be reused
        self._counts[path] = self._counts.get(path, 0) + 1

    def per_layer(self) -> Dict[str, torch.Tensor]:
        return {path: (total / self._counts[path]).cpu() for path, total in self._sums.items()}

    def average(self) -> torch.Tensor:
        """Mean over layers, each resized (bilinear) to the finest layer's grid: (videos, F, h, w)."""
        layers = list(self.per_layer().values())
        if not layers:
            raise ValueError("no difference maps were recorded: spatial matching was off or never ran")
        size = max((m.shape[-2:] for m in layers), key=lambda s: s[0] * s[1])
        resized = [F.interpolate(m, size=tuple(size), mode="bilinear", align_corners=False) for m in layers]
        return torch.stack(resized).mean(0)
