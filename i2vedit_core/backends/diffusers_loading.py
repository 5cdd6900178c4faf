"""Loading SVD for the diffusers backend from local files only: never the network.

Two sources: a diffusers folder (unet/, vae/, image_encoder/) and an original single-file
`.safetensors` checkpoint (the file ComfyUI's Image Only Checkpoint Loader reads).
"""

import json
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors import safe_open

from .diffusers import DiffusersBackend
from .sgm_unet_keys import SGM_CHECKPOINT_PREFIX, infer_unet_config, sgm_unet_to_diffusers, use_sgm_groupnorm_eps

VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "conditioner.embedders.0.open_clip.model."
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")

PathLike = Union[str, Path]


def load_svd(path: PathLike, dtype: torch.dtype = torch.float16, device: Optional[str] = None,
             sgm_groupnorm_eps: bool = True) -> DiffusersBackend:
    """Load SVD from a diffusers folder or a single-file `.safetensors` checkpoint.

    `sgm_groupnorm_eps` sets the resnet GroupNorm eps to the original model's 1e-5 (diffusers
    builds some with 1e-6), so results match ComfyUI; single files always get it.
    """
    path = Path(path)
    if path.is_dir():
        return load_diffusers_folder(path, dtype, device, sgm_groupnorm_eps)
    return load_single_file(path, dtype, device)


def load_diffusers_folder(folder: PathLike, dtype: torch.dtype = torch.float16, device: Optional[str] = None,
                          sgm_groupnorm_eps: bool = True) -> DiffusersBackend:
    from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel
    from transformers import CLIPVisionModelWithProjection

    folder = Path(folder)
    missing = [sub for sub in ("unet", "vae", "image_encoder") if not (folder / sub / "config.json").is_file()]
    if missing:
        raise ValueError(f"{folder} is not a diffusers SVD folder: missing {', '.join(missing)}/config.json "
                         "(expected the layout of stabilityai/stable-video-diffusion-img2vid)")
    _check_unet_config(folder / "unet" / "config.json")
    kwargs = dict(local_files_only=True, torch_dtype=dtype)
    unet = UNetSpatioTemporalConditionModel.from_pretrained(folder, subfolder="unet", **kwargs)
    vae = AutoencoderKLTemporalDecoder.from_pretrained(folder, subfolder="vae", **kwargs)
    clip = CLIPVisionModelWithProjection.from_pretrained(folder / "image_encoder", local_files_only=True, dtype=dtype)
    if sgm_groupnorm_eps:
        use_sgm_groupnorm_eps(unet)
    return _assemble(unet, vae, clip, device)


def load_single_file(path: PathLike, dtype: torch.dtype = torch.float16, device: Optional[str] = None,
                     head_dim: int = 64) -> DiffusersBackend:
    """Load UNet, VAE and CLIP image encoder from one original-layout SVD checkpoint."""
    path = Path(path)
    tensors = read_safetensors(path)
    unet = unet_from_sgm_state_dict(tensors, path, head_dim)
    vae = _single_file_vae(tensors, path)
    clip = _single_file_clip(tensors, path)
    return _assemble(unet.to(dtype), vae.to(dtype), clip.to(dtype), device)


def unet_from_sgm_state_dict(tensors: dict, path: PathLike, head_dim: int = 64):
    """The diffusers UNet of an SGM-layout checkpoint's `model.diffusion_model.*` tensors (eps fixed to SGM's)."""
    from diffusers import UNetSpatioTemporalConditionModel

    unet_sd = _strip(tensors, SGM_CHECKPOINT_PREFIX)
    if not any(".time_stack." in k for k in unet_sd):
        raise ValueError(f"{path} is not a Stable Video Diffusion checkpoint: no 'model.diffusion_model.*time_stack*' "
                         "keys (SD 1.5/SDXL image checkpoints have no temporal layers); pass an SVD img2vid file")
    try:
        config = infer_unet_config({k: tuple(v.shape) for k, v in unet_sd.items()}, head_dim)
        converted = sgm_unet_to_diffusers(unet_sd, config["layers_per_block"])
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err
    with torch.device("meta"):
        unet = UNetSpatioTemporalConditionModel(**config)
    _load_exact(unet, converted, Path(path), "UNet")
    use_sgm_groupnorm_eps(unet)
    return unet


def read_safetensors(path: Path) -> dict:
    """All tensors of a `.safetensors` file, with errors that name the file and the fix."""
    if not path.is_file():
        raise ValueError(f"checkpoint not found: {path}")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ValueError(f"{path} is a pickle-based file, which can run code when loaded; "
                         "convert it to .safetensors first (i2vedit never unpickles checkpoints)")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises several types for corrupt/truncated headers
        raise ValueError(f"{path} is not a readable .safetensors file ({err}); "
                         "re-download it or check that the copy is complete") from err


def _single_file_vae(tensors: dict, path: Path):
    from diffusers import AutoencoderKLTemporalDecoder
    from .sgm_vae_keys import sgm_vae_to_diffusers, vae_config_from_shapes

    vae_sd = _strip(tensors, VAE_PREFIX)
    if not vae_sd:
        raise ValueError(f"{path} has no VAE ('{VAE_PREFIX}*' keys); use a full SVD checkpoint or a diffusers folder")
    try:
        converted = sgm_vae_to_diffusers(vae_sd)
        config = vae_config_from_shapes({k: tuple(v.shape) for k, v in converted.items()})
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err
    with torch.device("meta"):
        vae = AutoencoderKLTemporalDecoder(**config)
    _load_exact(vae, converted, path, "VAE")
    return vae


def _single_file_clip(tensors: dict, path: Path):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    from .openclip_keys import clip_vision_config_from_shapes, openclip_vision_to_transformers

    clip_sd = _strip(tensors, CLIP_PREFIX)
    if not clip_sd:
        raise ValueError(f"{path} has no CLIP image encoder ('{CLIP_PREFIX}*' keys); "
                         "use a full SVD checkpoint or a diffusers folder")
    try:
        converted = openclip_vision_to_transformers(clip_sd)
        config = CLIPVisionConfig(**clip_vision_config_from_shapes({k: tuple(v.shape) for k, v in converted.items()}))
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err
    clip = CLIPVisionModelWithProjection(config)  # not on meta: it has non-persistent buffers to build
    _load_exact(clip, converted, path, "CLIP image encoder", assign=False)
    return clip


def _load_exact(module: torch.nn.Module, state_dict: dict, path: Path, what: str, assign: bool = True) -> None:
    expected = set(module.state_dict())
    missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise ValueError(f"{path}: the {what} does not match SVD's layout: {len(missing)} missing keys "
                         f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    mismatched = [k for k, v in module.state_dict().items() if tuple(v.shape) != tuple(state_dict[k].shape)]
    if mismatched:
        raise ValueError(f"{path}: the {what} has {len(mismatched)} tensors of unexpected shape (e.g. {mismatched[:3]})")
    module.load_state_dict(state_dict, strict=True, assign=assign)


def _strip(tensors: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _check_unet_config(config_path: Path) -> None:
    config = json.loads(config_path.read_text())
    if config.get("_class_name") != "UNetSpatioTemporalConditionModel":
        raise ValueError(f"{config_path} describes a {config.get('_class_name')}, not SVD's "
                         "UNetSpatioTemporalConditionModel: pass a Stable Video Diffusion img2vid folder")


def _assemble(unet, vae, clip, device: Optional[str]) -> DiffusersBackend:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return DiffusersBackend(unet.to(device), vae.to(device), clip.to(device), device)
