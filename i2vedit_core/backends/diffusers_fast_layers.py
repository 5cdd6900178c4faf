"""The diffusers UNet's faster layers for the duration of a backend's UNet call (the ComfyUI backend's two).

- SVD's cross-attention (attn2) attends to one key, so its output is v for every query (comfy_cross_attention
  says why, and the decision about the to_q/to_k adapters): a processor that returns to_out(v) without q, k or a
  kernel, or runs the module's own processor for any other call.
- Every GroupNorm through the split-statistics GroupNorm (group_norm.py).
The objects are made once per UNet (`FastLayers`) and set and taken off around each call, as `use_attention`
does for attn1: between calls the user's UNet is as it was, and a compiled UNet sees the same forwards each call.
"""

from contextlib import contextmanager
from typing import Iterator

import torch

from ..group_norm import GroupNormForward

ATTN2_SUFFIX = ".attn2"


class OneKeyAttnProcessor:
    """attn2 processor (diffusers' contract) for one key; any other call goes to `inner`, the module's own."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        if not one_key(attn, hidden_states, encoder_hidden_states, attention_mask):
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        v = attn.to_v(encoder_hidden_states)
        # One row per query in memory, as a kernel's output: to_out rounds as it would after one, and a LoRA on a
        # temporal to_out drops each element on its own.
        out = attn.to_out[0](v.expand(hidden_states.shape[0], hidden_states.shape[1], v.shape[-1]).contiguous())
        out = attn.to_out[1](out)
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def one_key(attn, hidden_states, context, mask) -> bool:
    plain = (getattr(attn, "spatial_norm", None) is None and getattr(attn, "group_norm", None) is None
             and not getattr(attn, "norm_cross", None))
    return (plain and mask is None and context is not None and hidden_states.dim() == context.dim() == 3
            and context.shape[1] == 1 and context.shape[0] == hidden_states.shape[0])


class FastLayers:
    """The attn2 processors and GroupNorm forwards of one UNet, made once. Only layers running diffusers' own
    softmax attention processor or torch's GroupNorm forward are replaced: another processor (an IP-Adapter's), a
    GroupNorm subclass or a forward someone set on the module (an offloading hook) is left as it is."""

    def __init__(self, unet: torch.nn.Module):
        self.attn2 = [(m, OneKeyAttnProcessor(m.processor)) for path, m in unet.named_modules()
                      if path.endswith(ATTN2_SUFFIX)]
        self.norms = [(m, GroupNormForward(m)) for m in unet.modules()
                      if isinstance(m, torch.nn.GroupNorm) and type(m).forward is torch.nn.GroupNorm.forward]
        self.plain = plain_processors()

    @contextmanager
    def installed(self) -> Iterator[None]:
        attn2 = [(m, m.processor, ours) for m, ours in self.attn2 if type(m.processor) in self.plain]
        norms = [(m, forward) for m, forward in self.norms if "forward" not in m.__dict__]
        try:
            for m, original, ours in attn2:
                ours.inner = original
                m.processor = ours
            for module, forward in norms:
                module.forward = forward
            yield
        finally:
            for module, _ in norms:
                module.__dict__.pop("forward", None)
            for m, original, _ in attn2:
                m.processor = original


def plain_processors() -> tuple:
    """diffusers' softmax attention processors (not nn.Modules): the ones whose one-key output is v."""
    from diffusers.models import attention_processor as ap

    return tuple(getattr(ap, name) for name in ("AttnProcessor2_0", "AttnProcessor") if hasattr(ap, name))
