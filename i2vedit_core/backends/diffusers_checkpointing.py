"""Activation checkpointing of the diffusers SVD UNet for training, on the layers `memory.checkpointed_layers`
names (the ComfyUI backend checkpoints the same ones, comfy_training.py)."""

from contextlib import contextmanager
from typing import Dict, Optional, Tuple

import torch

from ..branch_dropout import CallSeeds, DropoutSeed
from ..memory import checkpointed_layers
from ..recompute import recompute
from .diffusers_fast_layers import fast_layer_kinds


@contextmanager
def checkpointing(unet, levels, seeds: Optional[CallSeeds] = None):
    """levels: False, True (every layer), n (the n finest levels) or (level, kind) pairs; the wrappers are removed
    afterwards. seeds: the LoRA dropout's call seeds, which a recomputation sets again (diffusers_lora)."""
    checkpointed = _checkpoint_heavy_layers(unet, levels, seeds or CallSeeds())
    try:
        yield
    finally:
        for module in checkpointed:
            del module.forward  # back to the class's forward


def heavy_layers(unet) -> Dict[Tuple[int, str], list]:
    """{(resolution level (0 = finest), kind): its spatio-temporal ResBlocks or its transformers}, as `memory`
    counts them."""
    levels = len(unet.down_blocks)
    blocks = [(i, b) for i, b in enumerate(unet.down_blocks)] + [(levels - 1, unet.mid_block)]
    blocks += [(levels - 1 - i, b) for i, b in enumerate(unet.up_blocks)]
    found: Dict[Tuple[int, str], list] = {}
    for level, block in blocks:
        found.setdefault((level, "resblock"), []).extend(block.resnets)
        found.setdefault((level, "transformer"), []).extend(getattr(block, "attentions", []))
    return found


def _checkpoint_heavy_layers(unet, gradient_checkpointing, seeds: CallSeeds) -> list:
    """Recompute the chosen levels' layers in backward instead of keeping their activations. Wrapped here
    rather than through diffusers' own flags: those checkpoint only the resnets, the transformers only in
    train mode (the UNet stays in eval mode)."""
    layers = heavy_layers(unet)
    modules = [m for layer in sorted(checkpointed_layers(len(unet.down_blocks), gradient_checkpointing))
               for m in layers.get(layer, [])]
    for module in modules:
        module.forward = _checkpointed(module, module.forward, seeds)
    return modules


def _checkpointed(module, forward, seeds: CallSeeds):
    """forward under activation checkpointing, recomputed with the attention processors, the GroupNorm, LayerNorm
    and GEGLU forwards and the LoRA dropout seed it ran with.

    Processors are swapped per call by `use_attention` (attention control, skip-interval) and the fast layers
    (diffusers_fast_layers); backward runs after the call has restored the defaults, so the recompute reinstalls
    the call's own. The seed makes the recomputation draw the forward's dropout masks without restoring any RNG
    state (a captured step cannot).
    """
    attentions = [m for m in module.modules() if hasattr(m, "set_processor") and hasattr(m, "processor")]
    norms = [m for m in module.modules() if isinstance(m, fast_layer_kinds())]
    holds_lora = any(name.startswith("temporal_transformer_blocks.") for name, _ in module.named_modules())  # LoRA sites

    def call(*args, **kwargs):
        if not torch.is_grad_enabled():  # nothing to recompute for
            return forward(*args, **kwargs)
        processors = [m.processor for m in attentions]
        norm_forwards = [m.__dict__.get("forward") for m in norms]
        seed = seeds.current or DropoutSeed()

        def run(*inner_args, **inner_kwargs):
            current = [m.processor for m in attentions]
            current_norms = [m.__dict__.get("forward") for m in norms]
            _set(attentions, norms, processors, norm_forwards)
            try:
                with seeds.call(seed):
                    return forward(*inner_args, **inner_kwargs)
            finally:
                _set(attentions, norms, current, current_norms)

        return recompute(run, *args, holds_trainable=holds_lora, **kwargs)

    return call


def _set(attentions, norms, processors, norm_forwards) -> None:
    for m, p in zip(attentions, processors):
        m.processor = p
    for m, f in zip(norms, norm_forwards):
        if f is None:
            m.__dict__.pop("forward", None)
        else:
            m.forward = f
