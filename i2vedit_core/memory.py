"""One memory policy for both backends: what the CLI's --memory, the API's PipelineSettings(memory=)
and every node's `memory` widget mean.

A setting is a tier name, "auto" or a GiB budget; it resolves to a `MemoryPlan` that decides
  checkpointing  which UNet layers training recomputes in backward (`checkpointed_layers`, the one
                 definition both backends apply: (resolution level, kind) pairs, a kind being the
                 spatio-temporal ResBlocks or the transformers of that level);
  decode_chunk   frames per VAE decode call (the SVD decoder mixes the frames of a call, so this is
                 the one tier setting that changes decoded pixels);
  offload        whether the VAE and CLIP image encoder leave the GPU while the UNet runs;
  compile        whether motion-LoRA training runs the UNet through `torch.compile` (CUDA only: 250
                 identical fixed-shape steps pay back the compile; docs/PERFORMANCE.md has the numbers).
"auto" reads the free memory of the device (a CPU device is "fast": it has no VRAM to save).
"""

import math
from dataclasses import dataclass
from typing import Callable, FrozenSet, Optional, Tuple, Union

import torch

GIB = 2 ** 30
LAYER_KINDS = ("resblock", "transformer")  # the heavy layers of each level that training may recompute
Layers = FrozenSet[Tuple[int, str]]  # (resolution level, 0 = finest; kind)


@dataclass(frozen=True)
class MemoryPlan:
    tier: str
    checkpointing: Union[bool, int, Layers]  # False: none; n: the n finest levels; True: all; or (level, kind) pairs
    decode_chunk: int
    offload: bool
    compile: bool = False

    def __str__(self):
        recomputed = {True: "every layer", False: "nothing"}.get(self.checkpointing) if isinstance(
            self.checkpointing, bool) else (f"the {self.checkpointing} finest levels" if isinstance(
                self.checkpointing, int) else layers_text(frozenset(self.checkpointing)))
        return (f"memory {self.tier}: training recomputes {recomputed}; decode {self.decode_chunk} frames a call; "
                f"VAE and CLIP {'offloaded' if self.offload else 'resident'}; compile {'on' if self.compile else 'off'}")


def checkpoint_setting(checkpointing):
    """A checkpointing setting in a hashable, JSON-writable form: bool and counts as they are, pairs as a sorted
    tuple of (level, kind) tuples (a LoRA's metadata records its training settings)."""
    if checkpointing is None or isinstance(checkpointing, (bool, int)):
        return checkpointing
    return tuple(sorted((int(level), str(kind)) for level, kind in checkpointing))


def parse_layers(text: str):
    """A checkpointing setting from text (benchmarks' --checkpointing): "none", "all", a level count ("3": the 3
    finest levels), or a set of comma-separated levels, each optionally restricted to one kind by its initial
    ("0,1,2r": every layer of levels 0 and 1 and the ResBlocks of level 2)."""
    text = text.strip().lower()
    if text in ("none", "all"):
        return text == "all"
    if text.isdigit():
        return int(text) or False
    pairs = set()
    for token in filter(None, (t.strip() for t in text.split(","))):
        level, initial = (token[:-1], token[-1]) if token[-1].isalpha() else (token, "")
        kinds = [k for k in LAYER_KINDS if k.startswith(initial)] if initial else list(LAYER_KINDS)
        if not level.isdigit() or not kinds:
            raise ValueError(f"checkpointing: {token!r} is not a level with an optional kind initial "
                             f"({', '.join(k[0] for k in LAYER_KINDS)}), as in 0,1,2r")
        pairs.update((int(level), kind) for kind in kinds)
    return frozenset(pairs)


def layers_text(layers: Layers) -> str:
    """`parse_layers`'s notation of a pair set, whole levels without an initial ("0,1,2r"), except a lone whole
    level, which would read as a count ("0r,0t")."""
    def spelled(level, whole):
        kinds = [kind for kind in LAYER_KINDS if (level, kind) in layers]
        return str(level) if whole and len(kinds) == len(LAYER_KINDS) else ",".join(f"{level}{k[0]}" for k in kinds)

    levels = sorted({level for level, _ in layers})
    text = ",".join(spelled(level, True) for level in levels)
    return ",".join(spelled(level, False) for level in levels) if text.isdigit() else text or "none"


# Fastest first; each tier lowers the peak further. min_gib: the free memory (or budget) it is picked from.
# 24gb recomputes every layer of the finest level, the transformers of levels 1 and 2, everything at the coarsest:
# the set bench/checkpoint_sweep.py measured fastest under an 18 GiB training peak (ComfyUI fp16: 629 ms, 17.2 GiB
# against 652 ms, 12.6 GiB for the three finest levels; docs/PERFORMANCE.md, run 7). Kept activations cost 3-5 ms of
# recomputation per GiB whichever layers hold them, so no set brings a 24 GiB card near the unchecked step.
PLANS = (
    (MemoryPlan("fast", False, 8, False), 32.0),
    (MemoryPlan("24gb", parse_layers("0,1t,2t,3"), 4, False), 20.0),
    (MemoryPlan("12gb", True, 2, True), 0.0),
)
TIERS = tuple(plan.tier for plan, _ in PLANS)
CHOICES = ("auto",) + TIERS  # the nodes' widget options


@dataclass(frozen=True)
class MemoryPolicy:
    """setting: "auto" (default), "fast", "24gb", "12gb", or a GiB budget (a number > 0)."""
    setting: Union[str, float] = "auto"

    def __post_init__(self):
        setting = self.setting
        if isinstance(setting, str) and setting not in CHOICES:
            try:
                setting = float(setting.lower().removesuffix("gib").removesuffix("gb"))
            except ValueError as error:
                raise ValueError(f"memory must be one of {', '.join(CHOICES)} or a GiB budget such as 16, "
                                 f"got {self.setting!r}") from error
        if not isinstance(setting, str) and not (isinstance(setting, (int, float)) and not isinstance(setting, bool)
                                                 and math.isfinite(setting) and setting > 0):
            raise ValueError(f"memory must be one of {', '.join(CHOICES)} or a GiB budget > 0, got {self.setting!r}")
        object.__setattr__(self, "setting", setting if isinstance(setting, str) else float(setting))

    def plan(self, device=None, free_bytes: Optional[Callable[[], int]] = None) -> MemoryPlan:
        """The plan for `device`; with "auto", `free_bytes()` (default: torch's free memory of the device)."""
        if self.setting in TIERS:
            return plan_of(self.setting)
        if self.setting == "auto":
            device = torch.device(device if device is not None else "cpu")
            if device.type != "cuda":
                return plan_of("fast")
            free = free_bytes() if free_bytes is not None else torch.cuda.mem_get_info(device)[0]
            return plan_for_gib(free / GIB)
        return plan_for_gib(self.setting)


def as_policy(memory) -> MemoryPolicy:
    return memory if isinstance(memory, MemoryPolicy) else MemoryPolicy(memory)


def plan_of(tier: str) -> MemoryPlan:
    return next(plan for plan, _ in PLANS if plan.tier == tier)


def plan_for_gib(gib: float) -> MemoryPlan:
    return next(plan for plan, min_gib in PLANS if gib >= min_gib)


def next_lower(tier: str) -> Optional[str]:
    """The tier below `tier` (the OOM advice), None at the lowest."""
    index = TIERS.index(tier)
    return TIERS[index + 1] if index + 1 < len(TIERS) else None


def checkpointed_layers(levels: int, checkpointing) -> Layers:
    """(level, kind) pairs of the UNet layers recomputed in backward; levels count from 0 = finest, as the UNet's
    down blocks do. checkpointing: False (none), True (every layer), n (every layer of the n finest levels: a
    coarser level costs as much compute per layer, 4x fewer tokens and 2x wider, but holds a quarter of the
    activations, so the finest go first), or (level, kind) pairs, a kind from LAYER_KINDS."""
    if checkpointing is True:
        return frozenset((level, kind) for level in range(levels) for kind in LAYER_KINDS)
    if checkpointing is None or isinstance(checkpointing, (bool, int)):
        return checkpointed_layers(levels, frozenset((level, kind) for level in range(min(int(checkpointing or 0), levels))
                                                     for kind in LAYER_KINDS))
    pairs = frozenset((int(level), kind) for level, kind in checkpointing)
    wrong = sorted(pair for pair in pairs if pair[1] not in LAYER_KINDS or not 0 <= pair[0] < levels)
    if wrong:
        raise ValueError(f"checkpointed layers must be (level in 0..{levels - 1}, kind in {LAYER_KINDS}), got {wrong}")
    return pairs


def oom_advice(plan: MemoryPlan) -> str:
    """What to change after an OOM under `plan`: the next tier down, never the one in use."""
    lower = next_lower(plan.tier)
    if lower is not None:
        step = (f"set memory to '{lower}' (the nodes' memory widget, --memory {lower}, "
                f"PipelineSettings(memory='{lower}')); memory was '{plan.tier}'. Or ")
    else:
        step = f"memory is already at its lowest setting ('{plan.tier}'): "
    return step + "use a smaller working size (e.g. 768x448) or fewer frames per clip, and close other GPU work"
