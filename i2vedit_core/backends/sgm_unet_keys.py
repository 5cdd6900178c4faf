"""SVD UNet key mapping between the original SGM / ComfyUI layout and diffusers (DIFFUSERS_NOTES 4.2).

SGM keys are given without their prefix (`model.diffusion_model.` in a checkpoint file,
`diffusion_model.` inside ComfyUI). No tensor needs reshaping, only renaming.
"""

import re
from typing import Dict, Iterable

import torch

SGM_CHECKPOINT_PREFIX = "model.diffusion_model."

_FIXED = [("time_embed.0.", "time_embedding.linear_1."), ("time_embed.2.", "time_embedding.linear_2."),
          ("label_emb.0.0.", "add_embedding.linear_1."), ("label_emb.0.2.", "add_embedding.linear_2."),
          ("input_blocks.0.0.", "conv_in."), ("out.0.", "conv_norm_out."), ("out.2.", "conv_out.")]
_RESNET_PARTS = [("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("emb_layers.1.", "time_emb_proj."),
                 ("out_layers.0.", "norm2."), ("out_layers.3.", "conv2."), ("skip_connection.", "conv_shortcut.")]
_ATTENTION_PARTS = [("time_stack.", "temporal_transformer_blocks."), ("time_pos_embed.0.", "time_pos_embed.linear_1."),
                    ("time_pos_embed.2.", "time_pos_embed.linear_2.")]
_MID = {"0": "mid_block.resnets.0.", "1": "mid_block.attentions.0.", "2": "mid_block.resnets.1."}


def _swap(name: str, pairs, reverse: bool = False) -> str:
    for sgm, diff in pairs:
        src, dst = (diff, sgm) if reverse else (sgm, diff)
        if name.startswith(src):
            return dst + name[len(src):]
    return name


def _resnet_to_diffusers(rest: str) -> str:
    if rest.startswith("time_mixer."):
        return rest
    if rest.startswith("time_stack."):
        return "temporal_res_block." + _swap(rest[len("time_stack."):], _RESNET_PARTS)
    return "spatial_res_block." + _swap(rest, _RESNET_PARTS)


def _resnet_to_sgm(rest: str) -> str:
    if rest.startswith("temporal_res_block."):
        return "time_stack." + _swap(rest[len("temporal_res_block."):], _RESNET_PARTS, reverse=True)
    if rest.startswith("spatial_res_block."):
        return _swap(rest[len("spatial_res_block."):], _RESNET_PARTS, reverse=True)
    return rest


def sgm_key_to_diffusers(key: str, layers_per_block: int = 2) -> str:
    """Map one SGM UNet key (prefix stripped) to its diffusers name; ValueError if it is not an SVD UNet key."""
    per = layers_per_block + 1
    for sgm, diff in _FIXED:
        if key.startswith(sgm):
            return diff + key[len(sgm):]
    m = re.fullmatch(r"input_blocks\.(\d+)\.(\d+)\.(.+)", key)
    if m:
        i, part, rest = int(m[1]), m[2], m[3]
        block, index = (i - 1) // per, (i - 1) % per
        if part == "0" and rest.startswith("op."):
            return f"down_blocks.{block}.downsamplers.0.conv.{rest[3:]}"
        if part == "0":
            return f"down_blocks.{block}.resnets.{index}.{_resnet_to_diffusers(rest)}"
        if part == "1":
            return f"down_blocks.{block}.attentions.{index}.{_swap(rest, _ATTENTION_PARTS)}"
    m = re.fullmatch(r"middle_block\.(\d)\.(.+)", key)
    if m and m[1] in _MID:
        rest = m[2]
        return _MID[m[1]] + (_swap(rest, _ATTENTION_PARTS) if m[1] == "1" else _resnet_to_diffusers(rest))
    m = re.fullmatch(r"output_blocks\.(\d+)\.(\d+)\.(.+)", key)
    if m:
        i, part, rest = int(m[1]), m[2], m[3]
        block, index = i // per, i % per
        if part in ("1", "2") and rest.startswith("conv."):
            return f"up_blocks.{block}.upsamplers.0.conv.{rest[5:]}"
        if part == "0":
            return f"up_blocks.{block}.resnets.{index}.{_resnet_to_diffusers(rest)}"
        if part == "1":
            return f"up_blocks.{block}.attentions.{index}.{_swap(rest, _ATTENTION_PARTS)}"
    raise ValueError(f"unexpected key '{key}': not a Stable Video Diffusion UNet key")


def diffusers_key_to_sgm(key: str, layers_per_block: int = 2, attention_up_blocks: Iterable[int] = (1, 2, 3)) -> str:
    """Inverse of `sgm_key_to_diffusers`. Upsamplers sit at index 2 in up blocks with attention, else 1."""
    per = layers_per_block + 1
    for sgm, diff in _FIXED:
        if key.startswith(diff):
            return sgm + key[len(diff):]
    m = re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.+)", key)
    if m:
        block, kind, index, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "downsamplers":
            return f"input_blocks.{(block + 1) * per}.0.op.{rest[len('conv.'):]}"
        i = block * per + index + 1
        return (f"input_blocks.{i}.0.{_resnet_to_sgm(rest)}" if kind == "resnets"
                else f"input_blocks.{i}.1.{_swap(rest, _ATTENTION_PARTS, reverse=True)}")
    for number, diff in _MID.items():
        if key.startswith(diff):
            rest = key[len(diff):]
            mapped = _swap(rest, _ATTENTION_PARTS, reverse=True) if number == "1" else _resnet_to_sgm(rest)
            return f"middle_block.{number}.{mapped}"
    m = re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.+)", key)
    if m:
        block, kind, index, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "upsamplers":
            slot = 2 if block in tuple(attention_up_blocks) else 1
            return f"output_blocks.{block * per + per - 1}.{slot}.conv.{rest[len('conv.'):]}"
        i = block * per + index
        return (f"output_blocks.{i}.0.{_resnet_to_sgm(rest)}" if kind == "resnets"
                else f"output_blocks.{i}.1.{_swap(rest, _ATTENTION_PARTS, reverse=True)}")
    raise ValueError(f"unexpected key '{key}': not a diffusers SVD UNet key")


def sgm_unet_to_diffusers(state_dict: Dict[str, torch.Tensor], layers_per_block: int = 2) -> Dict[str, torch.Tensor]:
    return {sgm_key_to_diffusers(k, layers_per_block): v for k, v in state_dict.items()}


def diffusers_unet_to_sgm(state_dict: Dict[str, torch.Tensor], layers_per_block: int = 2) -> Dict[str, torch.Tensor]:
    return {diffusers_key_to_sgm(k, layers_per_block): v for k, v in state_dict.items()}


def infer_unet_config(shapes: Dict[str, tuple], head_dim: int = 64) -> dict:
    """diffusers UNetSpatioTemporalConditionModel kwargs from the shapes of an SGM UNet state dict.

    Attention head counts are not visible in the weights; SVD uses head_dim 64 everywhere.
    """
    def out_channels(key):
        if key not in shapes:
            raise ValueError(f"missing key '{key}': not a Stable Video Diffusion UNet")
        return shapes[key][0]

    blocks = {int(k.split(".")[1]) for k in shapes if k.startswith("input_blocks.")}
    downsamplers = sorted(int(k.split(".")[1]) for k in shapes if re.fullmatch(r"input_blocks\.\d+\.0\.op\.weight", k))
    if not downsamplers:
        raise ValueError("no downsampler found: not a Stable Video Diffusion UNet")
    per = downsamplers[0]  # the first downsampler follows `layers_per_block` resnets
    levels = (max(blocks) - 1) // per + 1
    widths = [out_channels(f"input_blocks.{lvl * per + 1}.0.out_layers.3.weight") for lvl in range(levels)]
    projection = shapes["label_emb.0.0.weight"][1]
    heads = [max(w // head_dim, 1) for w in widths]
    return dict(sample_size=96, in_channels=shapes["input_blocks.0.0.weight"][1],
                out_channels=out_channels("out.2.weight"),
                down_block_types=("CrossAttnDownBlockSpatioTemporal",) * (levels - 1) + ("DownBlockSpatioTemporal",),
                up_block_types=("UpBlockSpatioTemporal",) + ("CrossAttnUpBlockSpatioTemporal",) * (levels - 1),
                block_out_channels=tuple(widths), layers_per_block=per - 1,
                addition_time_embed_dim=projection // 3, projection_class_embeddings_input_dim=projection,
                cross_attention_dim=shapes["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"][1],
                num_attention_heads=tuple(heads), num_frames=14)


def use_sgm_groupnorm_eps(unet: torch.nn.Module) -> None:
    """Set resnet GroupNorm eps to SGM's 1e-5 (diffusers builds several with 1e-6), so outputs match ComfyUI."""
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.GroupNorm) and ".resnets." in name:
            module.eps = 1e-5
