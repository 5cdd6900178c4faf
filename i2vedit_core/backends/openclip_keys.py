"""SVD image-encoder key mapping: OpenCLIP ViT (SGM `FrozenOpenCLIPImageEmbedder`) <-> transformers CLIP.

Keys are given without the checkpoint prefix `conditioner.embedders.0.open_clip.model.`, so the image
tower's keys start with `visual.` (the prefix ComfyUI's ImageOnlyCheckpointLoader reads). SGM builds the
whole OpenCLIP model and deletes only the text transformer, so a file also carries a few text-tower
tensors (`token_embedding`, `positional_embedding`, `ln_final`, `text_projection`, `logit_scale`); they
play no part in image encoding and are dropped.

Differences beyond renaming:
- `attn.in_proj_weight/bias` hold q, k and v stacked on dim 0; transformers has separate projections.
- `visual.proj` is (width, embed_dim) and applied as `x @ proj`; `visual_projection.weight` is its transpose.
- activation: OpenCLIP ViT-H-14 (SVD's `laion2b_s32b_b79k`) uses exact GELU (`quick_gelu` is off);
  transformers' `CLIPVisionConfig` defaults to "quick_gelu", so the config must say "gelu".
- LayerNorm eps is 1e-5 on both sides.
"""

import re
from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch

OPENCLIP_PREFIX = "conditioner.embedders.0.open_clip.model."

# Text-tower leftovers in SGM files (see module docstring).
TEXT_TOWER_KEYS = frozenset({"token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias",
                             "text_projection", "logit_scale"})

_TOP = {"visual.class_embedding": "vision_model.embeddings.class_embedding",
        "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
        "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
        "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
        "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
        "visual.ln_post.weight": "vision_model.post_layernorm.weight",
        "visual.ln_post.bias": "vision_model.post_layernorm.bias"}
_LAYER = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
          "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_TOP_INVERSE = {d: s for s, d in _TOP.items()}
_LAYER_INVERSE = {d: s for s, d in _LAYER.items()}
_QKV = ("q_proj", "k_proj", "v_proj")
_OPENCLIP_IN_PROJ = re.compile(r"visual\.transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)")
_OPENCLIP_LAYER = re.compile(r"visual\.transformer\.resblocks\.(\d+)\.(ln_1|ln_2|attn\.out_proj|mlp\.c_fc|mlp\.c_proj)"
                             r"\.(weight|bias)")
_HF_QKV = re.compile(r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj)\.(weight|bias)")
_HF_LAYER = re.compile(r"vision_model\.encoder\.layers\.(\d+)\."
                       r"(layer_norm1|layer_norm2|self_attn\.out_proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)")

# OpenCLIP's ViT configs use head_width 64 except these widths (model_configs/*.json): H-14 1280/80,
# g-14 1408/88, bigG-14 1664/104, e-14 1792/112, all 16 heads. Head count is not stored in weights.
OPENCLIP_HEADS_BY_WIDTH = {1280: 16, 1408: 16, 1664: 16, 1792: 16}
OPENCLIP_DEFAULT_HEAD_WIDTH = 64


def _openclip_key_to_transformers(key: str, value: torch.Tensor) -> Dict[str, torch.Tensor]:
    """One OpenCLIP tensor -> its transformers tensor(s); empty if the key is not part of the image tower."""
    if key in _TOP:
        return {_TOP[key]: value}
    if key == "visual.proj":
        return {"visual_projection.weight": value.t().contiguous()}
    m = _OPENCLIP_IN_PROJ.fullmatch(key)
    if m:
        prefix = f"vision_model.encoder.layers.{m[1]}.self_attn."
        # clone: views of one storage cannot be saved with safetensors
        return {f"{prefix}{name}.{m[2]}": part.clone() for name, part in zip(_QKV, value.chunk(3, dim=0))}
    m = _OPENCLIP_LAYER.fullmatch(key)
    if m:
        return {f"vision_model.encoder.layers.{m[1]}.{_LAYER[m[2]]}.{m[3]}": value}
    return {}


def openclip_vision_to_transformers(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """OpenCLIP model tensors (prefix stripped) -> `CLIPVisionModelWithProjection` state dict.

    Text-tower leftovers are dropped; any other key that is not part of an OpenCLIP ViT image tower
    raises ValueError naming it.
    """
    out = {}
    for key, value in state_dict.items():
        if key in TEXT_TOWER_KEYS:
            continue
        converted = _openclip_key_to_transformers(key, value)
        if not converted:
            raise ValueError(f"unexpected key {key!r} in the OpenCLIP image encoder "
                             f"({OPENCLIP_PREFIX}*): not an OpenCLIP ViT image tower")
        out.update(converted)
    return out


def _stack_qkv(state_dict: Mapping[str, torch.Tensor], q_key: str) -> torch.Tensor:
    keys = [q_key.replace(".q_proj.", f".{name}.") for name in _QKV]
    missing = [k for k in keys if k not in state_dict]
    if missing:
        raise ValueError(f"CLIPVisionModelWithProjection state dict has {q_key} but not {missing}")
    return torch.cat([state_dict[k] for k in keys], dim=0)


def _transformers_key_to_openclip(key: str, state_dict: Mapping[str, torch.Tensor]) -> Optional[Dict]:
    """One transformers tensor -> its OpenCLIP tensor; {} for k/v (stacked with q); None if unknown."""
    value = state_dict[key]
    if key in _TOP_INVERSE:
        return {_TOP_INVERSE[key]: value}
    if key == "visual_projection.weight":
        return {"visual.proj": value.t().contiguous()}
    m = _HF_QKV.fullmatch(key)
    if m:  # q, k and v become one stacked tensor, written when q is seen
        if m[2] != "q_proj":
            return {}
        return {f"visual.transformer.resblocks.{m[1]}.attn.in_proj_{m[3]}": _stack_qkv(state_dict, key)}
    m = _HF_LAYER.fullmatch(key)
    if m:
        return {f"visual.transformer.resblocks.{m[1]}.{_LAYER_INVERSE[m[2]]}.{m[3]}": value}
    return None


def transformers_vision_to_openclip(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """`CLIPVisionModelWithProjection` state dict -> OpenCLIP `visual.*` tensors (the inverse mapping)."""
    out = {}
    for key in state_dict:
        converted = _transformers_key_to_openclip(key, state_dict)
        if converted is None:
            raise ValueError(f"unexpected key {key!r} in CLIPVisionModelWithProjection state dict")
        out.update(converted)
    return out


def _shape(value) -> Tuple[int, ...]:
    return tuple(getattr(value, "shape", value))


def openclip_num_heads(width: int) -> int:
    """Attention heads of an OpenCLIP ViT of this width (see OPENCLIP_HEADS_BY_WIDTH)."""
    if width in OPENCLIP_HEADS_BY_WIDTH:
        return OPENCLIP_HEADS_BY_WIDTH[width]
    if width % OPENCLIP_DEFAULT_HEAD_WIDTH:
        raise ValueError(f"cannot tell the attention head count of a width-{width} CLIP image encoder from its "
                         f"weights (not a multiple of {OPENCLIP_DEFAULT_HEAD_WIDTH}); pass num_attention_heads")
    return width // OPENCLIP_DEFAULT_HEAD_WIDTH


def clip_vision_config_from_shapes(shapes: Mapping[str, Sequence[int]],
                                   num_attention_heads: Optional[int] = None) -> dict:
    """`CLIPVisionConfig` kwargs from transformers-named tensor shapes (or tensors).

    Heads are not stored in the weights: `num_attention_heads` wins, else `openclip_num_heads(width)`.
    The activation is not stored either: "gelu" is right for SVD's ViT-H-14 (laion2b_s32b_b79k); OpenCLIP
    "-quickgelu" models (e.g. OpenAI-trained ones) need hidden_act="quick_gelu" instead.
    """
    try:
        width, channels, patch, _ = _shape(shapes["vision_model.embeddings.patch_embedding.weight"])
        positions = _shape(shapes["vision_model.embeddings.position_embedding.weight"])[0]
        intermediate = _shape(shapes["vision_model.encoder.layers.0.mlp.fc1.weight"])[0]
        projection = _shape(shapes["visual_projection.weight"])[0]
    except KeyError as err:
        raise ValueError(f"the OpenCLIP image encoder lacks {err.args[0]}: not an OpenCLIP ViT") from err
    grid = round((positions - 1) ** 0.5)
    if grid * grid != positions - 1:
        raise ValueError(f"the OpenCLIP image encoder has {positions} positions, not 1 + a square grid")
    layers = 1 + max(int(m[1]) for m in map(_HF_LAYER.fullmatch, shapes) if m)  # fc1 exists, so >= 1 match
    heads = num_attention_heads or openclip_num_heads(width)
    if width % heads:
        raise ValueError(f"width {width} is not divisible by {heads} attention heads")
    return dict(hidden_size=width, intermediate_size=intermediate, projection_dim=projection,
                num_hidden_layers=layers, num_attention_heads=heads, num_channels=channels,
                image_size=grid * patch, patch_size=patch, hidden_act="gelu", layer_norm_eps=1e-5)
