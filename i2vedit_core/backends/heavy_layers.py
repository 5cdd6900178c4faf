"""How the UNet's heavy layers run during training, for both backends: compiled, recomputed, or plain.

The heavy layers are the spatio-temporal ResBlocks and transformers (`memory.checkpointed_levels` counts
them by resolution level). Each backend replaces their `forward` with one that asks a `HeavyLayers`
switch two things per call:
- which levels recompute in backward (gradient checkpointing, the memory tiers);
- whether the layer's class runs through `torch.compile` ("regional" compilation).

Why compile per layer class rather than the whole UNet (docs/PERFORMANCE.md has the numbers): dynamo
keeps one graph per distinct input shape of a class and layers of equal shape share it (parameters are
graph inputs), so the SVD UNet compiles about a dozen small graphs instead of one graph of the whole
forward and backward; and checkpointing wraps the compiled layer from outside, so the 24gb and 12gb
tiers run compiled too instead of splitting one big graph at each recomputed layer.
"""

from contextlib import contextmanager
from typing import Callable, Dict, Iterable

import torch

# Graphs dynamo may keep per layer class: one per distinct shape, times grad on/off and LoRA on/off;
# torch's default (8) would drop the UNet's later layers back to eager without an error.
RECOMPILE_LIMIT = 128


class HeavyLayers:
    """levels: resolution levels recomputed in backward; compiled: {layer class: its compiled forward}."""

    def __init__(self):
        self.levels = frozenset()
        self.compiled: Dict[type, Callable] = {}

    def forward_of(self, module: torch.nn.Module) -> Callable:
        """The unbound forward `module` runs now: its class's, or the compiled one while compiling."""
        cls = type(module)
        return self.compiled.get(cls, cls.forward)

    def recomputes(self, level: int) -> bool:
        return level in self.levels and torch.is_grad_enabled()

    @contextmanager
    def compiling(self, classes: Iterable[type], backend: str):
        """Inside: every layer of `classes` runs `torch.compile(cls.forward, backend=backend)`, static shapes
        (training repeats one shape). Dynamo caches on the function's code, so a later block (the next
        clip) reuses the graphs without compiling again."""
        previous = self.compiled
        self.compiled = {cls: torch.compile(cls.forward, backend=backend, dynamic=False)
                         for cls in classes}
        limits = {name: max(RECOMPILE_LIMIT, getattr(torch._dynamo.config, name))
                  for name in ("recompile_limit", "accumulated_recompile_limit")
                  if hasattr(torch._dynamo.config, name)}
        try:
            with torch._dynamo.config.patch(**limits):
                yield
        finally:
            self.compiled = previous
