import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from i2vedit_core.backends.diffusers_loading import unet_from_sgm_state_dict
from i2vedit_core.backends.sgm_unet_keys import (diffusers_key_to_sgm, diffusers_unet_to_sgm, infer_unet_config,
                                                 use_sgm_groupnorm_eps,
                                                 sgm_key_to_diffusers)
from i2vedit_core.tiny import tiny_unet

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def real_sgm_shapes():
    # Generated once from Stability-AI/generative-models' VideoUNet built with configs/inference/svd.yaml.
    return {k: tuple(v) for k, v in json.loads((DATA / "svd_unet_sgm_keys.json").read_text()).items()}


def test_real_size_keys_map_one_to_one(real_sgm_shapes):
    from diffusers import UNetSpatioTemporalConditionModel
    with torch.device("meta"):
        unet = UNetSpatioTemporalConditionModel(num_frames=14)
    diffusers_shapes = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    assert len(real_sgm_shapes) == len(diffusers_shapes) == 1428
    mapped = {sgm_key_to_diffusers(k): shape for k, shape in real_sgm_shapes.items()}
    assert mapped == diffusers_shapes  # 0 missing, 0 unexpected, same shapes
    assert {diffusers_key_to_sgm(k) for k in diffusers_shapes} == set(real_sgm_shapes)


def test_infer_config_from_real_shapes(real_sgm_shapes):
    from diffusers import UNetSpatioTemporalConditionModel
    config = infer_unet_config(real_sgm_shapes)
    assert config["block_out_channels"] == (320, 640, 1280, 1280)
    assert config["num_attention_heads"] == (5, 10, 20, 20)
    assert config["cross_attention_dim"] == 1024 and config["projection_class_embeddings_input_dim"] == 768
    with torch.device("meta"):
        unet = UNetSpatioTemporalConditionModel(**config)
    assert sum(p.numel() for p in unet.parameters()) == 1_524_623_082


@pytest.mark.parametrize("sgm,diffusers", [
    ("input_blocks.1.1.time_stack.0.attn1.to_q.weight",
     "down_blocks.0.attentions.0.temporal_transformer_blocks.0.attn1.to_q.weight"),
    ("output_blocks.11.1.time_stack.0.attn1.to_v.weight",
     "up_blocks.3.attentions.2.temporal_transformer_blocks.0.attn1.to_v.weight"),
    ("input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
     "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"),
    ("output_blocks.2.1.conv.weight", "up_blocks.0.upsamplers.0.conv.weight"),
    ("output_blocks.5.2.conv.bias", "up_blocks.1.upsamplers.0.conv.bias"),
    ("input_blocks.3.0.op.weight", "down_blocks.0.downsamplers.0.conv.weight"),
    ("input_blocks.4.0.time_stack.in_layers.2.weight", "down_blocks.1.resnets.0.temporal_res_block.conv1.weight"),
    ("middle_block.2.time_mixer.mix_factor", "mid_block.resnets.1.time_mixer.mix_factor"),
    ("middle_block.1.time_pos_embed.0.weight", "mid_block.attentions.0.time_pos_embed.linear_1.weight"),
    ("label_emb.0.2.bias", "add_embedding.linear_2.bias"),
])
def test_documented_examples(sgm, diffusers):
    assert sgm_key_to_diffusers(sgm) == diffusers
    assert diffusers_key_to_sgm(diffusers) == sgm


def test_unknown_key_is_rejected():
    with pytest.raises(ValueError, match="not a Stable Video Diffusion UNet key"):
        sgm_key_to_diffusers("cond_stage_model.transformer.text_model.embeddings.weight")


def test_tiny_exact_key_unet_round_trips_through_sgm_layout(tmp_path):
    unet = tiny_unet(seed=0, exact_keys=True)
    with torch.no_grad():  # randomise every tensor so no zero-init hides a swapped key
        for p in unet.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    sgm = {"model.diffusion_model." + k: v.contiguous() for k, v in diffusers_unet_to_sgm(unet.state_dict()).items()}
    assert len(sgm) == 1428
    save_file(sgm, tmp_path / "tiny_svd.safetensors")
    from safetensors.torch import load_file
    loaded = unet_from_sgm_state_dict(load_file(tmp_path / "tiny_svd.safetensors"), "tiny", head_dim=32).eval()
    assert set(loaded.state_dict()) == set(unet.state_dict())
    assert not any(p.is_meta for p in loaded.parameters())
    x = torch.randn(1, 4, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    args = (torch.tensor(0.3), torch.randn(1, 1, 32), torch.tensor([[6.0, 127.0, 0.02]]))
    use_sgm_groupnorm_eps(unet)  # the loader sets SGM's GroupNorm eps; compare like with like
    with torch.no_grad():
        ref, out = unet(x, *args).sample, loaded(x, *args).sample
    assert torch.allclose(ref, out, atol=1e-5), float((ref - out).abs().max())
