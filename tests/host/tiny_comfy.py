"""Tiny SVD built from ComfyUI's own classes, sharing weights with tiny diffusers models.

COMFYUI_NOTES 7.5: the UNet is `supported_models.SVD_img2vid` -> `model_base.SVD_img2vid`
(width 64 instead of 320, 2 heads of 32), the VAE is `comfy.sd.VAE` on SVD's video-VAE
detection path (shrunk to width 32), CLIP vision is `ClipVisionModel` from a shrunk ViT-H config.
Each is filled from a seeded random diffusers/transformers model through the core's key mappings
(`diffusers_unet_to_sgm`, `diffusers_vae_to_sgm`), so the two backends hold the same weights.
Imported only when COMFYUI_PATH is set (see conftest.py).
"""

import contextlib
import json
from pathlib import Path

import torch

WIDTH, HEAD_DIM, CONTEXT, ADM_DIM = 64, 32, 64, 256
CLIP = dict(hidden_size=64, intermediate_size=128, projection_dim=CONTEXT, num_hidden_layers=2,
            num_attention_heads=2, image_size=64, patch_size=16, num_channels=3, hidden_act="gelu",
            layer_norm_eps=1e-5)
VAE_WIDTH = 32


def _jitter(module: torch.nn.Module, seed: int, scale: float = 0.02, replace: bool = False) -> torch.nn.Module:
    """Seeded N(0, scale^2) added to every parameter, so no zero-initialised layer hides a mapping error.
    replace: the draw becomes the parameter (ComfyUI's ops skip weight init: torch.empty)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            noise = scale * torch.randn(p.shape, generator=gen)
            p.copy_(noise) if replace else p.add_(noise)
    return module.eval().requires_grad_(False)


def diffusers_unet(seed: int = 0):
    from diffusers import UNetSpatioTemporalConditionModel

    from i2vedit_core.backends.sgm_unet_keys import use_sgm_groupnorm_eps

    torch.manual_seed(seed)
    unet = UNetSpatioTemporalConditionModel(
        in_channels=8, out_channels=4, cross_attention_dim=CONTEXT, addition_time_embed_dim=ADM_DIM,
        projection_class_embeddings_input_dim=3 * ADM_DIM, num_frames=4, sample_size=8, layers_per_block=2,
        down_block_types=("CrossAttnDownBlockSpatioTemporal",) * 3 + ("DownBlockSpatioTemporal",),
        up_block_types=("UpBlockSpatioTemporal",) + ("CrossAttnUpBlockSpatioTemporal",) * 3,
        block_out_channels=(WIDTH,) * 4, num_attention_heads=WIDTH // HEAD_DIM)
    use_sgm_groupnorm_eps(unet)  # ComfyUI's resnet GroupNorms use 1e-5 (DIFFUSERS_NOTES 4.3)
    return _jitter(unet, seed)


def diffusers_vae(seed: int = 1):
    from diffusers import AutoencoderKLTemporalDecoder

    torch.manual_seed(seed)
    # layers_per_block 2: SGM's decoder mid block always has two resnets (sgm_vae_keys docstring).
    vae = AutoencoderKLTemporalDecoder(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                                       block_out_channels=(VAE_WIDTH,) * 4, layers_per_block=2, latent_channels=4,
                                       sample_size=64)
    return _jitter(vae, seed)


def transformers_clip(seed: int = 2):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    return _jitter(CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP)), seed)


def unet_config() -> dict:
    """The detected-config dict of SVD (COMFYUI_NOTES 1.3) with the width shrunk."""
    return dict(model_channels=WIDTH, in_channels=8, out_channels=4, num_res_blocks=[2, 2, 2, 2],
                channel_mult=[1, 1, 1, 1], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], transformer_depth_middle=1,
                context_dim=CONTEXT, adm_in_channels=3 * ADM_DIM, num_classes="sequential",
                use_linear_in_transformer=True, use_spatial_transformer=True, legacy=False, image_size=32,
                use_checkpoint=False, extra_ff_mix_layer=True, use_spatial_context=True,
                merge_strategy="learned_with_images", merge_factor=0.0, video_kernel_size=[3, 1, 1],
                use_temporal_resblock=True, use_temporal_attention=True, disable_temporal_crossattention=False)


def comfy_model(unet):
    """A MODEL (ModelPatcher of model_base.SVD_img2vid) holding the diffusers UNet's weights."""
    import comfy.model_patcher
    import comfy.supported_models

    from i2vedit_core.backends.sgm_unet_keys import diffusers_unet_to_sgm

    conf = comfy.supported_models.SVD_img2vid(unet_config())
    conf.unet_config["num_head_channels"] = HEAD_DIM  # SVD's is 64; 2 heads exercise the head split
    conf.set_inference_dtype(torch.float32, None)
    model = conf.get_model({}, device=torch.device("cpu"))
    model.diffusion_model.load_state_dict(diffusers_unet_to_sgm(unet.state_dict()), strict=True)
    model.eval().requires_grad_(False)
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"),
                                            offload_device=torch.device("cpu"))


@contextlib.contextmanager
def _shrunk_video_vae():
    """comfy.sd.VAE hard-codes SVD's VAE widths on its video-VAE path; build the same classes narrower."""
    import comfy.sd

    original = comfy.sd.AutoencodingEngine

    def narrow(**kwargs):
        for part in ("encoder_config", "decoder_config"):
            kwargs[part]["params"].update(ch=VAE_WIDTH, ch_mult=[1, 1, 1, 1])
        return original(**kwargs)

    comfy.sd.AutoencodingEngine = narrow
    try:
        yield
    finally:
        comfy.sd.AutoencodingEngine = original


def comfy_vae(vae):
    """A VAE (comfy.sd.VAE: AutoencodingEngine + temporal VideoDecoder) holding the diffusers VAE's weights."""
    import comfy.sd

    from i2vedit_core.backends.sgm_vae_keys import diffusers_vae_to_sgm

    sgm = diffusers_vae_to_sgm(vae.state_dict())
    if "decoder.mid.block_1.mix_factor" not in sgm:
        raise AssertionError("converted VAE lacks the key ComfyUI detects the SVD video VAE by")
    with _shrunk_video_vae():
        out = comfy.sd.VAE(sd=sgm, dtype=torch.float32)
    loaded = out.first_stage_model.state_dict()
    if set(loaded) != set(sgm) or any(not torch.equal(loaded[k], sgm[k]) for k in sgm):
        raise AssertionError("ComfyUI's VAE did not take every converted tensor")
    return out


def comfy_clip_vision(clip, folder: Path):
    """A CLIP_VISION (ClipVisionModel) from a shrunk copy of ComfyUI's ViT-H config, fp32."""
    import comfy.clip_vision

    config = json.loads((Path(comfy.clip_vision.__file__).parent / "clip_vision_config_h.json").read_text())
    config.update(CLIP)
    path = folder / "clip_vision_tiny.json"
    path.write_text(json.dumps(config))
    out = comfy.clip_vision.ClipVisionModel(str(path))
    out.model.to(torch.float32).requires_grad_(False)  # ComfyUI picks fp16 for image encoders, even on CPU
    weights = {k: v for k, v in clip.state_dict().items() if k != "vision_model.embeddings.position_ids"}
    missing, unexpected = out.load_sd(weights)
    if missing or unexpected:
        raise AssertionError(f"ClipVisionModel keys differ: missing {missing}, unexpected {unexpected}")
    return out


def comfy_parts_without_diffusers(folder: Path) -> dict:
    """MODEL, CLIP_VISION and VAE from ComfyUI's classes alone, seeded random weights: for an environment
    without diffusers/transformers' CLIP (the pack must run there; test_host_install blocks them)."""
    import comfy.clip_vision
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models

    conf = comfy.supported_models.SVD_img2vid(unet_config())
    conf.unet_config["num_head_channels"] = HEAD_DIM
    conf.set_inference_dtype(torch.float32, None)
    unet = conf.get_model({}, device=torch.device("cpu"))
    _jitter(unet.diffusion_model, 0, replace=True)
    model = comfy.model_patcher.ModelPatcher(unet.eval().requires_grad_(False), load_device=torch.device("cpu"),
                                             offload_device=torch.device("cpu"))
    with _shrunk_video_vae():  # the key ComfyUI detects SVD's video VAE by; every weight is filled below
        vae = comfy.sd.VAE(sd={"decoder.mid.block_1.mix_factor": torch.zeros(1)}, dtype=torch.float32)
    _jitter(vae.first_stage_model, 1, replace=True)
    config = json.loads((Path(comfy.clip_vision.__file__).parent / "clip_vision_config_h.json").read_text())
    config.update(CLIP)
    path = folder / "clip_vision_tiny.json"
    path.write_text(json.dumps(config))
    clip_vision = comfy.clip_vision.ClipVisionModel(str(path))
    _jitter(clip_vision.model.to(torch.float32), 2, replace=True)
    return dict(model=model, clip_vision=clip_vision, vae=vae)
