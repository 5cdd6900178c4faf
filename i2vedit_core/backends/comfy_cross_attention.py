"""SVD's cross-attention (attn2) over its one context token, without an attention kernel (ComfyUI backend).

Every attn2 of SVD attends to a single key: the CLIP image embedding (spatial blocks) and the same token repeated
per position (temporal blocks). A softmax over one key is exactly 1, so the output is v for every query whatever q
and k are; ComfyUI still projects q and k and runs an attention kernel on them, forward and backward (its share of
an H200 step: docs/PERFORMANCE.md, run 10). The object-patched forward below returns to_out(v, one row per query):
the same numbers, since any attention kernel returns v itself here. With a mask, more than one key, batches that
differ or another pack's attention function (`optimized_attention_override`), ComfyUI's own forward runs; another
pack's attn2 replacement is called by ComfyUI instead of this module, and another pack's object patch on the same
forward is kept (comfy_forwards installs this one only where there is none).

Decision (docs/PERFORMANCE.md, run 10): q and k are not computed, so the motion LoRA's adapters on the temporal
attn2.to_q and attn2.to_k get no gradient (theirs is 0: they feed only that one-key softmax) and AdamW, which skips
a parameter without one, leaves them as initialised instead of decaying them. Their branch changes no output either
way.
"""

from typing import Dict

import torch

ATTN2_SUFFIX = ".attn2"


class OneKeyCrossAttention:
    """Replacement `forward` of one attn2 module (CrossAttention.forward's signature); not an nn.Module, so that
    setting it adds no state-dict key."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def __call__(self, x, context=None, value=None, mask=None, transformer_options={}):
        m = self.module
        source = context if value is None else value
        if not one_key(x, context, source, mask) or "optimized_attention_override" in transformer_options:
            return type(m).forward(m, x, context=context, value=value, mask=mask,
                                   transformer_options=transformer_options)
        v = m.to_v(source)
        # One row per query in memory, as an attention output: to_out's Linear then takes the path (and the
        # rounding) it takes after a kernel, and the LoRA on a temporal to_out drops each element on its own.
        return m.to_out(v.expand(x.shape[0], x.shape[1], v.shape[-1]).contiguous())


def one_key(x, context, source, mask) -> bool:
    return (mask is None and context is not None and context.dim() == 3 and context.shape[1] == 1
            and source.dim() == 3 and source.shape[1] == 1 and context.shape[0] == source.shape[0] == x.shape[0])


def forwards(diffusion_model: torch.nn.Module) -> Dict[str, OneKeyCrossAttention]:
    """{object-patch name: forward} of every attn2 module of `diffusion_model`."""
    return {f"diffusion_model.{path}.forward": OneKeyCrossAttention(module)
            for path, module in diffusion_model.named_modules() if path.endswith(ATTN2_SUFFIX)}
