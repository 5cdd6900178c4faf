"""Tiny random-weight SVD-architecture models and a synthetic clip.

For the test suite and the CLI's plumbing demo: no downloads, seconds on 2 CPU cores.
Configurations from DIFFUSERS_NOTES 2.3-2.4: `svd_topology` has every real module path of
SVD's UNet; `svd_keys_exact` also has exactly the real key set (for key-mapping tests).
"""

import math

import torch

UNET_TOPOLOGY = dict(
    in_channels=8, out_channels=4, cross_attention_dim=32, addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=24, num_frames=14, sample_size=8, layers_per_block=2,
    down_block_types=("CrossAttnDownBlockSpatioTemporal",) * 3 + ("DownBlockSpatioTemporal",),
    up_block_types=("UpBlockSpatioTemporal",) + ("CrossAttnUpBlockSpatioTemporal",) * 3,
    block_out_channels=(32, 32, 32, 32), num_attention_heads=2,
)
UNET_KEYS_EXACT = dict(UNET_TOPOLOGY, block_out_channels=(32, 64, 96, 96), num_attention_heads=(1, 2, 3, 3))
VAE_TINY = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                block_out_channels=(32, 32, 32, 32), layers_per_block=1, latent_channels=4, sample_size=64)


def tiny_unet(seed: int = 0, exact_keys: bool = False):
    from diffusers import UNetSpatioTemporalConditionModel
    torch.manual_seed(seed)
    return UNetSpatioTemporalConditionModel(**(UNET_KEYS_EXACT if exact_keys else UNET_TOPOLOGY)).eval()


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKLTemporalDecoder
    torch.manual_seed(seed)
    return AutoencoderKLTemporalDecoder(**VAE_TINY).eval()


def tiny_clip(seed: int = 0, image_size: int = 64):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=37, projection_dim=32, num_hidden_layers=2,
                              num_attention_heads=4, image_size=image_size, patch_size=16)
    return CLIPVisionModelWithProjection(config).eval()


def tiny_backend(seed: int = 0, exact_keys: bool = False, device: str = "cpu"):
    from .backends.diffusers import DiffusersBackend
    return DiffusersBackend(tiny_unet(seed, exact_keys).to(device), tiny_vae(seed + 1).to(device),
                            tiny_clip(seed + 2).to(device), torch.device(device))


def synthetic_clip(num_frames: int = 6, height: int = 64, width: int = 64, seed: int = 0) -> torch.Tensor:
    """Frames (T, 3, H, W) in [-1, 1]: a constant background, a textured square moving right and a flat bar.

    The background and the bar (bottom rows, another exact constant) are the flat areas SARP
    must perturb; the square carries seeded texture and moves a few pixels per frame.
    """
    gen = torch.Generator().manual_seed(seed)
    background = torch.tensor([0.2, -0.1, 0.3]).view(3, 1, 1)
    size = max(height // 4, 4)
    texture = torch.rand(3, size, size, generator=gen) * 1.6 - 0.8
    frames = []
    for t in range(num_frames):
        frame = background.expand(3, height, width).clone()
        left = int(round((width - size) * t / max(num_frames - 1, 1) * 0.5))
        top = height // 4 + int(round(2 * math.sin(t)))
        frame[:, top:top + size, left:left + size] = texture
        frame[:, height - height // 8:, :] = torch.tensor([0.5, -0.25, 0.0]).view(3, 1, 1)
        frames.append(frame)
    return torch.stack(frames).clamp(-1, 1)
