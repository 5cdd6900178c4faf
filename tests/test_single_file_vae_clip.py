"""Single-file SVD checkpoints: VAE (`first_stage_model.*`) and CLIP image encoder (OpenCLIP ViT-H) key mapping.

The JSON files in tests/data list every tensor (key -> shape) of the real modules, generated once from
generative-models' `Encoder` + `VideoDecoder` (configs/inference/svd.yaml) and open_clip's ViT-H-14 with the
text transformer deleted (as SGM's FrozenOpenCLIPImageEmbedder does), both built on the meta device.
"""

import json
import re
from pathlib import Path

import pytest
import torch

from i2vedit_core.backends.openclip_keys import (TEXT_TOWER_KEYS, clip_vision_config_from_shapes,
                                                 openclip_vision_to_transformers, transformers_vision_to_openclip)
from i2vedit_core.backends.sgm_vae_keys import (SVD_VAE_CONFIG, diffusers_vae_to_sgm, sgm_vae_to_diffusers,
                                                vae_config_from_shapes)

DATA = Path(__file__).parent / "data"
TINY_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                block_out_channels=[32, 32, 32, 32], layers_per_block=1, latent_channels=4, sample_size=64)
TINY_CLIP = dict(hidden_size=32, intermediate_size=37, projection_dim=32, num_hidden_layers=2,
                 num_attention_heads=4, image_size=64, patch_size=16, hidden_act="gelu")
VIT_H = dict(hidden_size=1280, intermediate_size=5120, projection_dim=1024, num_hidden_layers=32,
             num_attention_heads=16, num_channels=3, image_size=224, patch_size=14, hidden_act="gelu",
             layer_norm_eps=1e-5)


def _load_shapes(name: str) -> dict:
    return {k: tuple(v) for k, v in json.loads((DATA / name).read_text()).items()}


def _shapes(state_dict: dict) -> dict:
    return {k: tuple(v.shape) for k, v in state_dict.items()}


def _meta_tensors(shapes: dict) -> dict:
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def _tiny_vae(seed: int):
    from diffusers import AutoencoderKLTemporalDecoder
    torch.manual_seed(seed)
    return AutoencoderKLTemporalDecoder(**TINY_VAE).eval()


def _tiny_clip(seed: int):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    torch.manual_seed(seed)
    return CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_CLIP)).eval()


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Non-trivial values everywhere (zero-initialised tensors would hide swapped keys)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))


# ---------------------------------------------------------------- VAE


def test_vae_roundtrip_through_sgm_layout_preserves_outputs():
    source = _tiny_vae(seed=0)
    _randomize(source, seed=1)  # includes a non-identity quant_conv, which must be folded into the encoder
    sgm = diffusers_vae_to_sgm(source.state_dict())
    assert not any(k.startswith("quant_conv") for k in sgm)
    target = _tiny_vae(seed=2)
    target.load_state_dict(sgm_vae_to_diffusers(sgm), strict=True)

    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        moments = source.encode(x).latent_dist.parameters, target.encode(x).latent_dist.parameters
        frames = source.decode(z, num_frames=3).sample, target.decode(z, num_frames=3).sample
    torch.testing.assert_close(moments[1], moments[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(frames[1], frames[0], atol=1e-4, rtol=1e-4)


def test_vae_mid_attention_is_conv_shaped_in_sgm_and_either_shape_loads():
    sgm = diffusers_vae_to_sgm(_tiny_vae(seed=0).state_dict())
    assert sgm["decoder.mid.attn_1.q.weight"].shape == (32, 32, 1, 1)
    assert sgm["encoder.mid.attn_1.proj_out.weight"].shape == (32, 32, 1, 1)
    linear = {k: (v.flatten(1) if v.dim() == 4 and ".attn_1." in k else v) for k, v in sgm.items()}
    converted = sgm_vae_to_diffusers(linear)
    assert converted["decoder.mid_block.attentions.0.to_q.weight"].shape == (32, 32)
    torch.testing.assert_close(converted["decoder.mid_block.attentions.0.to_q.weight"],
                               sgm_vae_to_diffusers(sgm)["decoder.mid_block.attentions.0.to_q.weight"])


def test_vae_sgm_layout_matches_real_svd_first_stage_model():
    from diffusers import AutoencoderKLTemporalDecoder
    real = _load_shapes("svd_first_stage_keys.json")
    with torch.device("meta"):
        vae = AutoencoderKLTemporalDecoder(**SVD_VAE_CONFIG)
    assert _shapes(diffusers_vae_to_sgm(vae.state_dict())) == real
    assert _shapes(sgm_vae_to_diffusers(_meta_tensors(real))) == _shapes(vae.state_dict())


def test_vae_config_from_real_svd_shapes():
    converted = sgm_vae_to_diffusers(_meta_tensors(_load_shapes("svd_first_stage_keys.json")))
    assert vae_config_from_shapes(_shapes(converted)) == SVD_VAE_CONFIG
    tiny = vae_config_from_shapes(_tiny_vae(seed=0).state_dict())
    assert tiny["block_out_channels"] == (32, 32, 32, 32) and tiny["layers_per_block"] == 1


def test_vae_config_rejects_sgm_depth_that_diffusers_cannot_build():
    # SGM's decoder mid block always has two resnets; diffusers ties that count to layers_per_block.
    real = _load_shapes("svd_first_stage_keys.json")
    dropped = (".block.2.", "encoder.down.0.block.1.", "encoder.down.1.block.1.", "encoder.down.2.block.1.",
               "encoder.down.3.block.1.")
    shallow = {k: s for k, s in real.items() if not any(d in k for d in dropped)}
    with pytest.raises(ValueError, match="mid block"):
        vae_config_from_shapes(_shapes(sgm_vae_to_diffusers(_meta_tensors(shallow))))


@pytest.mark.parametrize("key", ["decoder.up.0.attn.0.q.weight", "model.diffusion_model.out.0.weight",
                                 "decoder.mid.attn_1.time_mix_block.attn1.to_q.weight", "post_quant_conv.weight"])
def test_vae_unknown_key_raises_value_error_naming_it(key):
    tensors = _meta_tensors(_load_shapes("svd_first_stage_keys.json"))
    tensors[key] = torch.empty(4, 4, device="meta")
    with pytest.raises(ValueError, match=re.escape(f"unexpected key '{key}' in first_stage_model: not an SVD VAE")):
        sgm_vae_to_diffusers(tensors)


# ---------------------------------------------------------------- CLIP image encoder


def test_clip_roundtrip_through_openclip_layout_preserves_image_embeds():
    source = _tiny_clip(seed=0)
    _randomize(source, seed=1)
    openclip = transformers_vision_to_openclip(source.state_dict())
    assert openclip["visual.transformer.resblocks.0.attn.in_proj_weight"].shape == (96, 32)
    assert openclip["visual.proj"].shape == (32, 32)
    target = _tiny_clip(seed=2)
    target.load_state_dict(openclip_vision_to_transformers(openclip), strict=True)

    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected, actual = source(pixel_values=pixels).image_embeds, target(pixel_values=pixels).image_embeds
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_clip_openclip_layout_matches_real_svd_image_encoder():
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    real = _load_shapes("svd_openclip_keys.json")
    with torch.device("meta"):
        clip = CLIPVisionModelWithProjection(CLIPVisionConfig(**VIT_H))
    visual = {k: s for k, s in real.items() if k not in TEXT_TOWER_KEYS}
    assert set(real) - set(visual) == TEXT_TOWER_KEYS  # the file's text-tower leftovers are all known
    assert _shapes(transformers_vision_to_openclip(clip.state_dict())) == visual
    assert _shapes(openclip_vision_to_transformers(_meta_tensors(real))) == _shapes(clip.state_dict())


def test_clip_config_from_real_svd_shapes_is_vit_h_with_exact_gelu():
    converted = openclip_vision_to_transformers(_meta_tensors(_load_shapes("svd_openclip_keys.json")))
    assert clip_vision_config_from_shapes(_shapes(converted)) == VIT_H


def test_clip_config_heads_come_from_the_caller_when_width_is_unusual():
    shapes = _shapes(_tiny_clip(seed=0).state_dict())
    with pytest.raises(ValueError, match="pass num_attention_heads"):
        clip_vision_config_from_shapes(shapes)
    config = clip_vision_config_from_shapes(shapes, num_attention_heads=4)
    assert {k: config[k] for k in TINY_CLIP} == TINY_CLIP


@pytest.mark.parametrize("key", ["visual.attn_pool.query", "transformer.resblocks.0.ln_1.weight",
                                 "visual.transformer.resblocks.0.attn.q_proj.weight"])
def test_clip_unknown_key_raises_value_error_naming_it(key):
    tensors = _meta_tensors(_load_shapes("svd_openclip_keys.json"))
    tensors[key] = torch.empty(4, device="meta")
    with pytest.raises(ValueError, match=re.escape(f"unexpected key '{key}'")):
        openclip_vision_to_transformers(tensors)
