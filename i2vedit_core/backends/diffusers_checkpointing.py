"""The heavy layers of the diffusers SVD UNet during training: activation checkpointing on the levels
`memory.checkpointed_levels` names, and regional torch.compile (heavy_layers.py; the ComfyUI backend
runs the same layers the same way, comfy_training.py)."""

import functools
from contextlib import ExitStack, contextmanager
from typing import Dict

from ..memory import checkpointed_levels
from .heavy_layers import HeavyLayers


@contextmanager
def checkpointing(unet, layers: HeavyLayers, levels):
    """levels: False, True (every level) or n (the n finest levels) recomputed in backward inside.
    Wrapped here rather than through diffusers' own flags: those checkpoint only the resnets, the
    transformers only in train mode (the UNet stays in eval mode)."""
    previous = layers.levels
    with heavy_layer_forwards(unet, layers):
        layers.levels = checkpointed_levels(len(unet.down_blocks), levels)
        try:
            yield
        finally:
            layers.levels = previous


@contextmanager
def compiled_layers(unet, layers: HeavyLayers, backend: str):
    """The heavy layers run their class's compiled forward inside (layers of equal shape share a graph)."""
    with ExitStack() as stack:
        stack.enter_context(heavy_layer_forwards(unet, layers))
        stack.enter_context(layers.compiling({type(m) for m in all_heavy_layers(unet)}, backend))
        yield


def heavy_layers_by_level(unet) -> Dict[int, list]:
    """{resolution level (0 = finest): its spatio-temporal ResBlocks and transformers}, as `memory` counts them."""
    levels = len(unet.down_blocks)
    blocks = [(i, b) for i, b in enumerate(unet.down_blocks)] + [(levels - 1, unet.mid_block)]
    blocks += [(levels - 1 - i, b) for i, b in enumerate(unet.up_blocks)]
    found: Dict[int, list] = {}
    for level, block in blocks:
        found.setdefault(level, []).extend(list(block.resnets) + list(getattr(block, "attentions", [])))
    return found


def all_heavy_layers(unet) -> list:
    return [m for layers in heavy_layers_by_level(unet).values() for m in layers]


@contextmanager
def heavy_layer_forwards(unet, layers: HeavyLayers):
    """Every heavy layer's `forward` follows `layers` inside; nested blocks keep the outer one's forwards."""
    installed = []
    for level, modules in heavy_layers_by_level(unet).items():
        for module in modules:
            if not isinstance(module.__dict__.get("forward"), LayerForward):
                module.forward = LayerForward(module, level, layers)
                installed.append(module)
    try:
        yield
    finally:
        for module in installed:
            del module.forward  # back to the class's forward


class LayerForward:
    """Replacement `forward` of one heavy layer: compiled while `layers` compiles its class, recomputed in
    backward while its level is switched on, with the attention processors it ran with.

    Processors are swapped per call by `use_attention` (attention control, skip-interval); backward
    runs after the call has restored the defaults, so the recompute reinstalls the call's own.
    """

    def __init__(self, module, level: int, layers: HeavyLayers):
        self.module, self.level, self.layers = module, level, layers
        self.attentions = [m for m in module.modules() if hasattr(m, "set_processor") and hasattr(m, "processor")]

    def __call__(self, *args, **kwargs):
        forward = functools.partial(self.layers.forward_of(self.module), self.module)
        if not self.layers.recomputes(self.level):
            return forward(*args, **kwargs)
        from torch.utils.checkpoint import checkpoint

        return checkpoint(self._with_processors(forward, [m.processor for m in self.attentions]), *args,
                          use_reentrant=False, **kwargs)

    def _with_processors(self, forward, processors):
        def run(*args, **kwargs):
            current = [m.processor for m in self.attentions]
            for m, p in zip(self.attentions, processors):
                m.processor = p
            try:
                return forward(*args, **kwargs)
            finally:
                for m, p in zip(self.attentions, current):
                    m.processor = p
        return run

