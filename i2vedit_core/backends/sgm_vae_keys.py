"""SVD VAE key mapping: original SGM / ComfyUI layout <-> diffusers `AutoencoderKLTemporalDecoder`.

SGM keys are given without their prefix (`first_stage_model.` in a checkpoint file). The SGM model is
`AutoencodingEngine(encoder=Encoder, decoder=VideoDecoder(time_mode="conv-only"))` from
generative-models' `configs/inference/svd.yaml`; ComfyUI builds the same module tree.

Differences beyond renaming:
- mid-block attention: SGM's `AttnBlock` uses 1x1 `Conv2d` for q/k/v/proj_out, weights (C, C, 1, 1);
  diffusers uses `Linear`, weights (C, C). Both shapes are accepted on the way in.
- `quant_conv`: SGM's `AutoencodingEngine` has none; diffusers always applies a 1x1 `quant_conv` after
  the encoder. Loading SGM weights inserts an identity; saving to SGM folds the diffusers `quant_conv`
  into `encoder.conv_out` (two linear maps compose exactly), so outputs are preserved both ways.
- decoder levels are numbered in opposite orders (`decoder.up.0` is diffusers' last `up_blocks`).
- diffusers' `MidBlockTemporalDecoder` has `layers_per_block` resnets, SGM's decoder mid block always
  two (`block_1`, `attn_1`, `block_2`). Only layers_per_block == 2 (SVD's value) matches SGM;
  `vae_config_from_shapes` rejects SGM weights with another depth.
"""

import re
from typing import Dict, Mapping, Sequence, Tuple

import torch

SGM_VAE_PREFIX = "first_stage_model."

# The SVD VAE (stabilityai/stable-video-diffusion-img2vid vae/config.json). sample_size cannot be read
# from weights; diffusers only uses it for tiling defaults.
SVD_VAE_CONFIG = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                      block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                      sample_size=768, scaling_factor=0.18215, force_upcast=True)

_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
# SGM's temporal half is an openaimodel ResBlock(dims=3); diffusers calls it TemporalResnetBlock.
_TIME_STACK = {"in_layers.0": "norm1", "in_layers.2": "conv1", "out_layers.0": "norm2", "out_layers.3": "conv2"}
_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_ENDS = {"conv_in": "conv_in", "norm_out": "conv_norm_out", "conv_out": "conv_out"}
_ATTENTION_LINEAR = re.compile(r".*\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight")


def _params(pairs: Dict[str, str]) -> Dict[str, str]:
    """Module-path pairs -> parameter-key pairs (every mapped module has a weight and a bias)."""
    return {f"{s}.{p}": f"{d}.{p}" for s, d in pairs.items() for p in ("weight", "bias")}


def _resnet_keys(sgm: str, diff: str, video: bool) -> Dict[str, str]:
    """Keys of one resnet; a decoder (video) resnet is split into spatial/temporal halves plus a mix factor."""
    if not video:
        return _params({f"{sgm}.{s}": f"{diff}.{d}" for s, d in _RESNET.items()})
    keys = _params({f"{sgm}.{s}": f"{diff}.spatial_res_block.{d}" for s, d in _RESNET.items()})
    keys.update(_params({f"{sgm}.time_stack.{s}": f"{diff}.temporal_res_block.{d}" for s, d in _TIME_STACK.items()}))
    keys[f"{sgm}.mix_factor"] = f"{diff}.time_mixer.mix_factor"
    return keys


def _mid_and_end_keys(side: str, video: bool) -> Dict[str, str]:
    keys = _resnet_keys(f"{side}.mid.block_1", f"{side}.mid_block.resnets.0", video)
    keys.update(_resnet_keys(f"{side}.mid.block_2", f"{side}.mid_block.resnets.1", video))
    attention = {f"{side}.mid.attn_1.{s}": f"{side}.mid_block.attentions.0.{d}" for s, d in _ATTENTION.items()}
    keys.update(_params(attention))
    keys.update(_params({f"{side}.{s}": f"{side}.{d}" for s, d in _ENDS.items()}))
    return keys


def _key_table(levels: int, layers: int) -> Dict[str, str]:
    """Every SGM key a VAE with this many levels / resnets per encoder level can have -> its diffusers key."""
    table = _mid_and_end_keys("encoder", video=False)
    table.update(_mid_and_end_keys("decoder", video=True))
    table.update(_params({"decoder.conv_out.time_mix_conv": "decoder.time_conv_out"}))
    for i in range(levels):
        up = levels - 1 - i  # SGM numbers decoder levels from the highest resolution, diffusers from the lowest
        for j in range(layers):
            table.update(_resnet_keys(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", False))
        for j in range(layers + 1):
            table.update(_resnet_keys(f"decoder.up.{i}.block.{j}", f"decoder.up_blocks.{up}.resnets.{j}", True))
        if i < levels - 1:
            table.update(_params({f"encoder.down.{i}.downsample.conv": f"encoder.down_blocks.{i}.downsamplers.0.conv"}))
        if i > 0:
            table.update(_params({f"decoder.up.{i}.upsample.conv": f"decoder.up_blocks.{up}.upsamplers.0.conv"}))
    return table


def _max_index(keys, pattern: str) -> int:
    found = [int(m[1]) for m in map(re.compile(pattern).match, keys) if m]
    return max(found) if found else -1


def _sgm_structure(keys) -> Tuple[int, int]:
    levels = 1 + max(_max_index(keys, r"encoder\.down\.(\d+)\."), _max_index(keys, r"decoder\.up\.(\d+)\."))
    layers = max(1 + _max_index(keys, r"encoder\.down\.\d+\.block\.(\d+)\."),
                 _max_index(keys, r"decoder\.up\.\d+\.block\.(\d+)\."))  # the decoder has one more per level
    return max(levels, 1), max(layers, 1)


def _diffusers_structure(keys) -> Tuple[int, int]:
    levels = 1 + max(_max_index(keys, r"encoder\.down_blocks\.(\d+)\."),
                     _max_index(keys, r"decoder\.up_blocks\.(\d+)\."))
    layers = max(1 + _max_index(keys, r"encoder\.down_blocks\.\d+\.resnets\.(\d+)\."),
                 _max_index(keys, r"decoder\.up_blocks\.\d+\.resnets\.(\d+)\."))
    return max(levels, 1), max(layers, 1)


def _identity_quant_conv(conv_out_bias: torch.Tensor) -> Dict[str, torch.Tensor]:
    channels = conv_out_bias.shape[0]
    eye = torch.eye(channels, dtype=conv_out_bias.dtype, device=conv_out_bias.device)
    return {"quant_conv.weight": eye.reshape(channels, channels, 1, 1),
            "quant_conv.bias": torch.zeros_like(conv_out_bias)}


def sgm_vae_to_diffusers(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """SGM `first_stage_model.*` tensors (prefix stripped) -> `AutoencoderKLTemporalDecoder` state dict.

    Raises ValueError naming the first key that an SVD VAE does not have.
    """
    table = _key_table(*_sgm_structure(state_dict))
    out = {}
    for key, value in state_dict.items():
        if key.startswith("quant_conv."):  # not in SVD, but harmless if a variant stores one
            out[key] = value
            continue
        if key not in table:
            raise ValueError(f"unexpected key {key!r} in first_stage_model: not an SVD VAE")
        target = table[key]
        out[target] = value.reshape(value.shape[:2]) if _ATTENTION_LINEAR.fullmatch(target) else value
    if "quant_conv.weight" not in out and "encoder.conv_out.bias" in out:
        out.update(_identity_quant_conv(out["encoder.conv_out.bias"]))
    return out


def _fold_quant_conv(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Compose quant_conv (1x1) with encoder.conv_out so the SGM encoder alone gives the same moments."""
    out = dict(state_dict)
    weight, bias = out.pop("quant_conv.weight"), out.pop("quant_conv.bias")
    q = weight.reshape(weight.shape[:2])
    if not weight.is_meta and torch.equal(q, torch.eye(q.shape[0], dtype=q.dtype, device=q.device)) and not bias.any():
        return out  # already the identity: keep encoder weights bit-exact
    conv_w, conv_b = out["encoder.conv_out.weight"], out["encoder.conv_out.bias"]
    out["encoder.conv_out.weight"] = torch.einsum("oi,ichw->ochw", q.to(conv_w.dtype), conv_w)
    out["encoder.conv_out.bias"] = q.to(conv_b.dtype) @ conv_b + bias.to(conv_b.dtype)
    return out


def diffusers_vae_to_sgm(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """`AutoencoderKLTemporalDecoder` state dict -> SGM `first_stage_model.*` layout (without the prefix)."""
    inverse = {d: s for s, d in _key_table(*_diffusers_structure(state_dict)).items()}
    source = _fold_quant_conv(dict(state_dict)) if "quant_conv.weight" in state_dict else state_dict
    out = {}
    for key, value in source.items():
        if key not in inverse:
            raise ValueError(f"unexpected key {key!r} in AutoencoderKLTemporalDecoder state dict: not an SVD VAE")
        out[inverse[key]] = value.reshape(*value.shape, 1, 1) if _ATTENTION_LINEAR.fullmatch(key) else value
    return out


def _shape(value) -> Tuple[int, ...]:
    return tuple(getattr(value, "shape", value))


def vae_config_from_shapes(shapes: Mapping[str, Sequence[int]]) -> dict:
    """`AutoencoderKLTemporalDecoder` kwargs read from diffusers-named tensor shapes (or tensors).

    Widths, depth and channel counts come from the weights; sample_size and scaling_factor are SVD's.
    """
    levels, layers = _diffusers_structure(shapes)
    try:
        widths = tuple(_shape(shapes[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"])[0] for i in range(levels))
        in_channels = _shape(shapes["encoder.conv_in.weight"])[1]
        latent = _shape(shapes["decoder.conv_in.weight"])[1]
        out_channels = _shape(shapes["decoder.conv_out.weight"])[0]
        moments = _shape(shapes["encoder.conv_out.weight"])[0]
    except KeyError as err:
        raise ValueError(f"first_stage_model has no tensor for diffusers' {err.args[0]}: not an SVD VAE") from err
    if moments != 2 * latent:
        raise ValueError(f"first_stage_model encoder outputs {moments} channels for {latent} latent channels "
                         "(expected 2x: mean and log-variance): not an SVD VAE")
    mid_resnets = 1 + _max_index(shapes, r"decoder\.mid_block\.resnets\.(\d+)\.")
    if mid_resnets != layers:
        raise ValueError(f"first_stage_model has {layers} resnets per encoder level but {mid_resnets} in the decoder "
                         "mid block; diffusers' temporal decoder ties the two (SVD: 2 and 2): not an SVD VAE")
    if any(w % 32 for w in widths):
        raise ValueError(f"first_stage_model widths {widths} are not multiples of 32 (GroupNorm groups): "
                         "not an SVD VAE")
    return dict(SVD_VAE_CONFIG, in_channels=in_channels, out_channels=out_channels,
                down_block_types=("DownEncoderBlock2D",) * levels, block_out_channels=widths,
                layers_per_block=layers, latent_channels=latent)
