"""Attention control on ComfyUI's SVD UNet: object-patched `forward` of the 32 attn1 modules.

COMFYUI_NOTES 3.3: spatial and temporal attn1 share one attn1_replace key, so each attn1 module's
`forward` is object-patched on the backend's clone with a stateless callable that knows its site by
construction (made once per UNet and shared by its backends: comfy_forwards). It reads the attention pass
from `transformer_options[CONTROLLER_KEY]` and passes straight through to the class's own forward when there
is none (bit-identical to the unpatched model). ModelPatcher applies the patches at load and restores the bound
methods at unpatch.

Sites carry the diffusers module paths (`sgm_key_to_diffusers`) and the same downscale factors as
`diffusers_attention`, so temporal presets, stage-2 exceptions and difference-map keys mean the
same thing on both backends. The batch layout comes from the pass (`rows`) and the shapes ComfyUI
records in transformer_options, never from counting calls.
"""

from typing import Dict, List, Tuple

import torch

from ..attention.site import AttentionSite, BatchLayout
from .sgm_unet_keys import sgm_key_to_diffusers
from .twins import merge_heads, split_heads

CONTROLLER_KEY = "i2vedit"
SPATIAL_SUFFIX = ".transformer_blocks.0.attn1"
TEMPORAL_SUFFIX = ".time_stack.0.attn1"
# cond_or_uncond entries ComfyUI uses (0 positive, 1 negative); a source video is a positive chunk.
ROLE_CHUNK = {"uncond": 1, "cond": 0, "source": 0}


class ControlledAttn1:
    """Replacement `forward` of one attn1 module (CrossAttention.forward's signature).

    Not an nn.Module on purpose: setting it as `forward` must not register a submodule (state-dict
    keys, and with them LoRA keys, would change).
    """

    def __init__(self, module: torch.nn.Module, site: AttentionSite):
        self.module, self.site = module, site

    def __call__(self, x, context=None, value=None, mask=None, transformer_options=None, **kwargs):
        options = {} if transformer_options is None else transformer_options
        attention = options.get(CONTROLLER_KEY)
        if attention is None:
            return type(self.module).forward(self.module, x, context=context, value=value, mask=mask,
                                             transformer_options=options, **kwargs)
        if mask is not None:
            raise ValueError(f"{self.site.path}: attention control handles unmasked self-attention only; "
                             "remove the node that adds an attention mask to attn1")
        m = self.module
        context = x if context is None else context  # other packs' attn1_patch may supply context/value
        q, k, v = m.to_q(x), m.to_k(context), m.to_v(context if value is None else value)
        batch, seq, _ = q.shape
        site = self.site_of(options, attention, batch, seq)
        out = attention(split_heads(q, m.heads), split_heads(k, m.heads), split_heads(v, m.heads), site)
        return m.to_out(merge_heads(out, q.dtype))

    def site_of(self, options: dict, attention, batch: int, seq: int) -> AttentionSite:
        """This call's site: rows from the pass, frames and token grid from ComfyUI's recorded shapes."""
        rows = tuple(attention.rows)
        chunks = options.get("cond_or_uncond")
        if chunks is not None and len(chunks) != len(rows):
            raise ValueError(f"{self.site.path}: the attention pass describes {len(rows)} videos {rows} but this "
                             f"UNet call batches {len(chunks)} chunks: drive attention control through the I2VEdit "
                             "samplers (they call the UNet once per pass)")
        total, (h, w) = options["original_shape"][0], options["activations_shape"][-2:]
        frames, tokens = total // len(rows), h * w
        expected = (len(rows) * frames, tokens) if self.site.kind == "spatial" else (len(rows) * tokens, frames)
        if total % len(rows) or (batch, seq) != expected:
            raise ValueError(f"{self.site.path}: a {self.site.kind} attention batch of {batch} x {seq} does not fit "
                             f"{len(rows)} videos of {total / len(rows):g} frames of {h}x{w} tokens")
        layout = BatchLayout(rows, frames, tokens, (h, w))
        return AttentionSite(self.site.kind, self.site.path, self.site.downscale, layout)


def attn1_modules(diffusion_model) -> Dict[str, Tuple[torch.nn.Module, AttentionSite]]:
    """{SGM path of each of the 32 attn1 modules: (module, site without layout)}."""
    per_block = int(diffusion_model.num_res_blocks[0])
    levels = len(diffusion_model.channel_mult)
    found = {}
    for path, module in diffusion_model.named_modules():
        for kind, suffix in (("spatial", SPATIAL_SUFFIX), ("temporal", TEMPORAL_SUFFIX)):
            if path.endswith(suffix):
                name = sgm_key_to_diffusers(path + ".weight", per_block)[:-len(".weight")]
                found[path] = (module, AttentionSite(kind, name, _downscale(path, per_block + 1, levels)))
    return found


def forwards(modules: Dict[str, Tuple[torch.nn.Module, AttentionSite]]) -> Dict[str, ControlledAttn1]:
    """{object-patch name: ControlledAttn1} of every attn1 module (comfy_forwards installs them)."""
    return {f"diffusion_model.{path}.forward": ControlledAttn1(module, site)
            for path, (module, site) in modules.items()}


def chunks_for(rows) -> List[int]:
    """cond_or_uncond matching the pass's rows, so other packs' patches see the same layout."""
    return [ROLE_CHUNK[role] for role in rows]


def _downscale(path: str, per_block: int, levels: int) -> int:
    """Latent width / layer width."""
    return 2 ** level_of(path, per_block, levels)


def level_of(path: str, per_block: int, levels: int) -> int:
    """Resolution level (0 = finest) from the SGM block index (input block i is at level (i-1)//per)."""
    block, index = path.split(".")[:2]
    if block == "middle_block":
        return levels - 1
    return (int(index) - 1) // per_block if block == "input_blocks" else levels - 1 - int(index) // per_block
