"""The diffusers UNet's faster layers for the duration of a backend's UNet call (the ComfyUI backend's two).

- SVD's cross-attention (attn2) attends to one key, so its output is v for every query (comfy_cross_attention
  says why, and the decision about the to_q/to_k adapters): a processor that returns to_out(v) without q, k or a
  kernel, or runs the module's own processor for any other call.
- Every GroupNorm through the split-statistics GroupNorm (group_norm.py).
- In a training step only, every LayerNorm in the activations' dtype (layer_norm.py, norm_precision.py) and every
  GEGLU as one kernel (geglu.py); an edit's forwards run them as PyTorch does.
The objects are made once per UNet (`FastLayers`) and set and taken off around each call, as `use_attention`
does for attn1: between calls the user's UNet is as it was, and a compiled UNet sees the same forwards each call.
"""

from contextlib import contextmanager
from typing import Iterator

import torch

from ..geglu import GegluForward
from ..group_norm import GroupNormForward
from ..layer_norm import LayerNormForward

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
    """The attn2 processors and GroupNorm, LayerNorm and GEGLU forwards of one UNet, made once. Only layers running
    diffusers' own softmax attention processor or their class's own forward are replaced: another processor (an
    IP-Adapter's), a subclass or a forward someone set on the module (an offloading hook) is left as it is."""

    def __init__(self, unet: torch.nn.Module):
        self.attn2 = [(m, OneKeyAttnProcessor(m.processor)) for path, m in unet.named_modules()
                      if path.endswith(ATTN2_SUFFIX)]
        self.norms = [(m, forward(m)) for m in unet.modules() for forward in [plain_forward(m)] if forward]
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


def plain_forward(module: torch.nn.Module):
    """The pack's forward class for a GroupNorm, LayerNorm or diffusers GEGLU running its class's own forward; None
    for any other module or a subclass with a forward of its own."""
    for kind, forward in zip(fast_layer_kinds(), (GroupNormForward, LayerNormForward, GegluForward)):
        if isinstance(module, kind) and type(module).forward is kind.forward:
            return forward
    return None


def fast_layer_kinds() -> tuple:
    """The module classes whose forward FastLayers sets (a checkpointed recomputation sets the call's again)."""
    from diffusers.models.activations import GEGLU

    return torch.nn.GroupNorm, torch.nn.LayerNorm, GEGLU


def plain_processors() -> tuple:
    """diffusers' softmax attention processors (not nn.Modules): the ones whose one-key output is v."""
    from diffusers.models import attention_processor as ap

    return tuple(getattr(ap, name) for name in ("AttnProcessor2_0", "AttnProcessor") if hasattr(ap, name))
