"""A whole original-layout SVD checkpoint (UNet + VAE + OpenCLIP image tower) loads into the diffusers backend."""

import pytest
import torch
from safetensors.torch import save_file

from i2vedit_core.backends.diffusers import DiffusersBackend
from i2vedit_core.backends.diffusers_loading import CLIP_PREFIX, VAE_PREFIX, load_svd
from i2vedit_core.backends.openclip_keys import transformers_vision_to_openclip
from i2vedit_core.backends.sgm_unet_keys import SGM_CHECKPOINT_PREFIX, diffusers_unet_to_sgm, use_sgm_groupnorm_eps
from i2vedit_core.backends.sgm_vae_keys import diffusers_vae_to_sgm
from i2vedit_core.conditioning import frame_conditioning
from i2vedit_core.tiny import UNET_KEYS_EXACT, VAE_TINY


def randomised(module):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return module.eval()


@pytest.fixture(scope="module")
def models():
    from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    torch.manual_seed(0)
    # Head counts are not stored in weights: the loader assumes SVD's head width 64 (UNet) and
    # open_clip's rule (CLIP), so the tiny models follow the same rules.
    unet = randomised(UNetSpatioTemporalConditionModel(**dict(UNET_KEYS_EXACT, num_attention_heads=(1, 1, 1, 1))))
    vae = AutoencoderKLTemporalDecoder(**dict(VAE_TINY, layers_per_block=2)).eval()  # SGM's VAE depth
    clip = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=64, intermediate_size=96, projection_dim=32, num_hidden_layers=2, num_attention_heads=1,
        image_size=64, patch_size=16, hidden_act="gelu")).eval()
    return unet, vae, clip


def write_checkpoint(path, unet, vae, clip):
    tensors = {SGM_CHECKPOINT_PREFIX + k: v for k, v in diffusers_unet_to_sgm(unet.state_dict()).items()}
    tensors.update({VAE_PREFIX + k: v for k, v in diffusers_vae_to_sgm(vae.state_dict()).items()})
    tensors.update({CLIP_PREFIX + k: v for k, v in transformers_vision_to_openclip(clip.state_dict()).items()})
    tensors[CLIP_PREFIX + "logit_scale"] = torch.tensor(4.6)  # text-tower leftover SGM files carry
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)


def test_single_file_checkpoint_matches_the_models_it_was_written_from(tmp_path, models, clip):
    unet, vae, image_encoder = models
    path = tmp_path / "svd_tiny.safetensors"
    write_checkpoint(path, unet, vae, image_encoder)
    loaded = load_svd(path, dtype=torch.float32, device="cpu")
    use_sgm_groupnorm_eps(unet)
    reference = DiffusersBackend(unet, vae, image_encoder, torch.device("cpu"))
    assert torch.allclose(loaded.encode(clip), reference.encode(clip), atol=1e-5)
    assert torch.allclose(loaded.image_embedding(clip[:2]), reference.image_embedding(clip[:2]), atol=1e-5)
    latents = reference.encode(clip)
    assert torch.allclose(loaded.decode(latents), reference.decode(latents), atol=1e-4)
    cond = frame_conditioning(reference, clip[0], len(clip), generator=torch.Generator().manual_seed(0))
    for sigma in (0.01, 1.0, 100.0):
        ours, ref = loaded.denoise(latents[None], sigma, cond), reference.denoise(latents[None], sigma, cond)
        assert torch.allclose(ours, ref, atol=1e-4, rtol=1e-4), (sigma, float((ours - ref).abs().max()))


def test_single_file_without_vae_names_what_is_missing(tmp_path, models):
    unet, _, _ = models
    path = tmp_path / "unet_only.safetensors"
    save_file({SGM_CHECKPOINT_PREFIX + k: v.contiguous() for k, v in diffusers_unet_to_sgm(unet.state_dict()).items()},
              path)
    with pytest.raises(ValueError, match="unet_only.safetensors has no VAE"):
        load_svd(path)
