"""Attention control on the diffusers SVD UNet: processors on the 32 attn1 modules.

`use_attention(unet, attention)` installs, for the duration of one evaluation, a processor on every
spatial and temporal attn1 (selected by module path, DIFFUSERS_NOTES §3.1) that projects q/k/v,
hands them head-split to `attention(q, k, v, site)` and projects the result out. Processors are
set per module (`set_attn_processor` wants all 64 names and consumes its dict) and the originals
are restored afterwards. A forward pre-hook reads the UNet input (B, F, C, h, w) so each call's
`BatchLayout` comes from the batch itself, not from counting calls.
"""

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, List, Tuple

from ..attention.site import AttentionSite, BatchLayout
from .twins import downscale, merge_heads, split_heads

SPATIAL_SUFFIX = ".transformer_blocks.0.attn1"
TEMPORAL_SUFFIX = ".temporal_transformer_blocks.0.attn1"


@dataclass
class _Input:
    """Shape of the UNet input of the current evaluation."""
    videos: int = 0
    frames: int = 0
    latent_hw: Tuple[int, int] = (0, 0)


class ControlledAttnProcessor:
    """attn1 processor whose attention itself is the controller's (diffusers processor contract)."""

    def __init__(self, site: AttentionSite, attention, unet_input: _Input):
        self.site, self.attention, self.input = site, attention, unet_input

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError(f"{self.site.path}: attention control handles self-attention without a mask only")
        batch, seq, _ = hidden_states.shape
        q, k, v = (split_heads(proj(hidden_states), attn.heads) for proj in (attn.to_q, attn.to_k, attn.to_v))
        out = merge_heads(self.attention(q, k, v, self._site(batch, seq)), q.dtype)
        return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor

    def _site(self, batch: int, seq: int) -> AttentionSite:
        rows = tuple(self.attention.rows)
        if len(rows) != self.input.videos:
            raise ValueError(f"the attention pass describes {len(rows)} videos {rows}, the UNet batch has "
                             f"{self.input.videos}")
        grid = _grid(self.input.latent_hw, self.site.downscale)
        tokens = seq if self.site.kind == "spatial" else batch // len(rows)
        layout = BatchLayout(rows, self.input.frames, tokens, grid if grid[0] * grid[1] == tokens else None)
        return AttentionSite(self.site.kind, self.site.path, self.site.downscale, layout)


def attn1_sites(unet) -> List[AttentionSite]:
    """The 32 self-attention sites (16 spatial, 16 temporal) with their downscale factors."""
    levels = len(unet.down_blocks)
    sites = []
    for path, _ in unet.named_modules():
        for kind, suffix in (("spatial", SPATIAL_SUFFIX), ("temporal", TEMPORAL_SUFFIX)):
            if path.endswith(suffix):
                sites.append(AttentionSite(kind, path, _downscale(path, levels)))
    return sites


@contextmanager
def use_attention(unet, attention) -> Iterator[None]:
    """Route every attn1 call of `unet` through `attention` (an AttentionPass) inside the block."""
    if attention is None:
        yield
        return
    unet_input = _Input()
    modules = [(unet.get_submodule(site.path), site) for site in attn1_sites(unet)]
    originals = [module.processor for module, _ in modules]
    hook = unet.register_forward_pre_hook(lambda m, args, kwargs: _read_input(unet_input, args, kwargs),
                                          with_kwargs=True)
    try:
        for module, site in modules:
            module.set_processor(ControlledAttnProcessor(site, attention, unet_input))
        yield
    finally:
        hook.remove()
        for (module, _), original in zip(modules, originals):
            module.set_processor(original)


def _read_input(unet_input: _Input, args, kwargs) -> None:
    sample = args[0] if args else kwargs["sample"]
    unet_input.videos, unet_input.frames = sample.shape[:2]
    unet_input.latent_hw = tuple(sample.shape[-2:])


def _downscale(path: str, levels: int) -> int:
    """The diffusers block index is the level (down block i, up block j counted from the bottom)."""
    block, index = path.split(".")[:2]
    if block == "mid_block":
        return downscale("mid", 0, levels)
    return downscale("down" if block == "down_blocks" else "up", int(index), levels)


def _grid(latent_hw: Tuple[int, int], downscale: int) -> Tuple[int, int]:
    """Token grid at a downscale factor: each stride-2 downsampler rounds up (padding 1, kernel 3)."""
    h, w = latent_hw
    for _ in range(int(math.log2(downscale))):
        h, w = -(-h // 2), -(-w // 2)
    return h, w
