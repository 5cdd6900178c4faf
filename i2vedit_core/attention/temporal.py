"""Temporal selector: which temporal layers use the source's attention probabilities (ALGORITHM §5)."""

import math
from dataclasses import dataclass
from typing import Tuple

PRESETS = {"local": (0.5, 0.8), "style": (0.8, 0.9), "shape": (0.4, 0.5)}
# Stage 2 keeps layers at least this much below latent resolution on the source (the paper's rule).
STAGE2_MIN_DOWNSCALE = 4
# The official code also keeps the edit's own attention at this stage-2 layer (OFFICIAL_CODE_NOTES §4b).
OFFICIAL_STAGE2_EXCEPTIONS = ("up_blocks.1.attentions.2.",)


@dataclass(frozen=True)
class TemporalSelector:
    """Stages from [beta1, beta2] over denoising steps k = 0.. (0 = sigma_max).

    k < floor(steps*beta1): source probabilities everywhere; then, until floor(steps*beta2), only in
    layers with downscale >= 4 (except module paths starting with an entry of `stage2_exceptions`);
    later: the edit's own attention.
    """
    beta1: float = 0.5
    beta2: float = 0.8
    stage2_exceptions: Tuple[str, ...] = ()

    def __post_init__(self):
        if not 0.0 <= self.beta1 <= self.beta2 <= 1.0:
            raise ValueError(f"temporal steps need 0 <= beta1 <= beta2 <= 1, got beta1={self.beta1}, "
                             f"beta2={self.beta2} (swap them if beta1 > beta2)")

    @staticmethod
    def preset(name: str, official_exceptions: bool = False) -> "TemporalSelector":
        if name not in PRESETS:
            raise ValueError(f"unknown temporal preset {name!r}: use one of {sorted(PRESETS)}")
        return TemporalSelector(*PRESETS[name], OFFICIAL_STAGE2_EXCEPTIONS if official_exceptions else ())

    def stage_bounds(self, steps: int) -> Tuple[int, int]:
        # The epsilon keeps e.g. 0.8 * 25 = 20 from flooring to 19 through rounding.
        return math.floor(steps * self.beta1 + 1e-9), math.floor(steps * self.beta2 + 1e-9)

    def uses_source(self, step: int, steps: int, downscale: int, path: str = "") -> bool:
        k1, k2 = self.stage_bounds(steps)
        if step < k1:
            return True
        if step < k2:
            return downscale >= STAGE2_MIN_DOWNSCALE and not path.startswith(self.stage2_exceptions)
        return False
