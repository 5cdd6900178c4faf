"""Full-size random-weight SVD for the benchmarks, on either backend, with the same weights.

The diffusers modules are initialised by diffusers/transformers themselves on the device (seconds
instead of minutes on the CPU); the ComfyUI parts are ComfyUI's own classes (`SVD_img2vid`,
`comfy.sd.VAE`, `ClipVisionModel`) filled with those weights through the core's key mappings, in the
dtypes ComfyUI picks itself when it loads an SVD checkpoint (fp16 UNet on a GPU). Speed does not
depend on weight values. `tiny=True` builds the CI's tiny models instead (CPU smoke runs).
"""

from pathlib import Path

import torch

CLIP_H = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, image_size=224,
              patch_size=14, projection_dim=1024, hidden_act="gelu", layer_norm_eps=1e-5)
# What ComfyUI's model detection reports for an SVD checkpoint (supported_models.SVD_img2vid + detection).
SVD_UNET_CONFIG = dict(model_channels=320, in_channels=8, out_channels=4, num_res_blocks=[2, 2, 2, 2],
                       channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                       transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], transformer_depth_middle=1,
                       context_dim=1024, adm_in_channels=768, num_classes="sequential", use_linear_in_transformer=True,
                       use_spatial_transformer=True, legacy=False, image_size=32, use_checkpoint=False,
                       extra_ff_mix_layer=True, use_spatial_context=True, merge_strategy="learned_with_images",
                       merge_factor=0.0, video_kernel_size=[3, 1, 1], use_temporal_resblock=True,
                       use_temporal_attention=True, disable_temporal_crossattention=False)


def diffusers_modules(device: str = "cuda", frames: int = 14):
    """(unet, vae, clip) at SVD's full size, random init on `device`, float32."""
    from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from i2vedit_core.backends.sgm_unet_keys import use_sgm_groupnorm_eps
    from i2vedit_core.backends.sgm_vae_keys import SVD_VAE_CONFIG

    with torch.device(device):
        unet = UNetSpatioTemporalConditionModel(num_frames=frames, sample_size=96)
        vae = AutoencoderKLTemporalDecoder(**SVD_VAE_CONFIG)
        clip = CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_H))
    use_sgm_groupnorm_eps(unet)  # as ComfyUI's resnets, so both backends compute the same function
    # legacy-constructed tensors (AlphaBlender.mix_factor) ignore the device context: move everything
    return unet.to(device), vae.to(device), clip.to(device)


def diffusers_backend(modules, dtype=torch.bfloat16, device="cuda"):
    from i2vedit_core.backends.diffusers import DiffusersBackend

    unet, vae, clip = modules
    return DiffusersBackend(unet.to(device, dtype), vae.to(device, dtype), clip.to(device, dtype), torch.device(device))


def setup_comfyui(root: str, cpu: bool = False) -> None:
    """Put a ComfyUI work tree on sys.path, configured before `comfy.model_management` is imported."""
    import sys

    if not (Path(root) / "comfy" / "model_patcher.py").is_file():
        raise SystemExit(f"{root} is not a ComfyUI work tree (no comfy/model_patcher.py): pass --comfyui PATH")
    sys.path.insert(0, str(Path(root).resolve()))
    import comfy.cli_args

    comfy.cli_args.args.cpu = cpu
    comfy.cli_args.args.use_pytorch_cross_attention = True  # ComfyUI's default on a GPU without xformers


def comfy_parts(modules, unet_config=None, head_channels: int = 64, clip_config=None):
    """MODEL, CLIP_VISION, VAE from ComfyUI's classes holding `modules`' weights, in ComfyUI's own dtypes."""
    import json
    import tempfile

    import comfy.clip_vision
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models

    from i2vedit_core.backends.sgm_unet_keys import diffusers_unet_to_sgm
    from i2vedit_core.backends.sgm_vae_keys import diffusers_vae_to_sgm

    unet, vae, clip = modules
    conf = comfy.supported_models.SVD_img2vid(dict(unet_config or SVD_UNET_CONFIG))
    conf.unet_config["num_head_channels"] = head_channels
    load_device = mm.get_torch_device()
    params = sum(p.numel() for p in unet.parameters())
    # As load_checkpoint_guess_config: the checkpoint is fp16, ComfyUI picks the dtype for this device.
    dtype = mm.unet_dtype(load_device, params, conf.supported_inference_dtypes, weight_dtype=torch.float16)
    conf.set_inference_dtype(dtype, mm.unet_manual_cast(dtype, load_device, conf.supported_inference_dtypes))
    model = conf.get_model({}, device=mm.unet_offload_device())
    model.diffusion_model.load_state_dict(diffusers_unet_to_sgm(unet.state_dict()), strict=True)
    model.eval().requires_grad_(False)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=mm.unet_offload_device())
    vae_out = comfy.sd.VAE(sd=diffusers_vae_to_sgm(vae.state_dict()))
    config = json.loads((Path(comfy.clip_vision.__file__).parent / "clip_vision_config_h.json").read_text())
    config.update(clip_config or {})
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(config, f)
    clip_vision = comfy.clip_vision.ClipVisionModel(f.name)
    weights = {k: v for k, v in clip.state_dict().items() if k != "vision_model.embeddings.position_ids"}
    missing, unexpected = clip_vision.load_sd(weights)
    if missing or unexpected:
        raise AssertionError(f"ClipVisionModel keys differ: missing {missing}, unexpected {unexpected}")
    return dict(model=patcher, clip_vision=clip_vision, vae=vae_out, dtype=dtype)


def comfy_profile_parts(root: str, tiny: bool, frames: int = 14):
    """ComfyUI set up from `root` and its SVD parts for a profile: full size on CUDA, or the CI's tiny models on the
    CPU (smoke runs); the diffusers modules they were filled from are moved off the GPU."""
    if not tiny and not torch.cuda.is_available():
        raise SystemExit("needs CUDA (or --tiny for the CPU smoke run)")
    setup_comfyui(root, cpu=tiny)
    torch.manual_seed(0)
    modules = tiny_modules(full_vae=True) if tiny else diffusers_modules("cuda", frames)
    parts = comfy_parts(modules, **({} if torch.cuda.is_available() else TINY_COMFY))
    for module in modules:
        module.to("cpu")
    return parts


def comfy_backend(parts):
    from i2vedit_core.backends.comfy import ComfyBackend

    return ComfyBackend(parts["model"], parts["clip_vision"], parts["vae"])


# --- tiny models for CPU smoke runs (the host tier's tiny SVD shapes) -----------------------------
TINY_WIDTH, TINY_HEAD, TINY_CONTEXT, TINY_ADM = 64, 32, 64, 256
TINY_CLIP = dict(hidden_size=64, intermediate_size=128, projection_dim=TINY_CONTEXT, num_hidden_layers=2,
                 num_attention_heads=2, image_size=64, patch_size=16, num_channels=3, hidden_act="gelu",
                 layer_norm_eps=1e-5)
TINY_COMFY = dict(unet_config=dict(SVD_UNET_CONFIG, model_channels=TINY_WIDTH, channel_mult=[1, 1, 1, 1],
                                   context_dim=TINY_CONTEXT, adm_in_channels=3 * TINY_ADM),
                  head_channels=TINY_HEAD, clip_config=TINY_CLIP)


def tiny_modules(full_vae: bool = False):
    """(unet, vae, clip), tiny and seeded, on the CPU. full_vae: SVD's real VAE widths (ComfyUI's
    `comfy.sd.VAE` builds those whatever the weights say)."""
    from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from i2vedit_core.backends.sgm_unet_keys import use_sgm_groupnorm_eps
    from i2vedit_core.backends.sgm_vae_keys import SVD_VAE_CONFIG
    from i2vedit_core.tiny import VAE_TINY

    torch.manual_seed(0)
    unet = UNetSpatioTemporalConditionModel(
        in_channels=8, out_channels=4, cross_attention_dim=TINY_CONTEXT, addition_time_embed_dim=TINY_ADM,
        projection_class_embeddings_input_dim=3 * TINY_ADM, num_frames=4, sample_size=8, layers_per_block=2,
        down_block_types=("CrossAttnDownBlockSpatioTemporal",) * 3 + ("DownBlockSpatioTemporal",),
        up_block_types=("UpBlockSpatioTemporal",) + ("CrossAttnUpBlockSpatioTemporal",) * 3,
        block_out_channels=(TINY_WIDTH,) * 4, num_attention_heads=TINY_WIDTH // TINY_HEAD)
    use_sgm_groupnorm_eps(unet)
    vae = AutoencoderKLTemporalDecoder(**(SVD_VAE_CONFIG if full_vae else dict(VAE_TINY, layers_per_block=2)))
    clip = CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_CLIP))
    return unet.eval(), vae.eval(), clip.eval()
