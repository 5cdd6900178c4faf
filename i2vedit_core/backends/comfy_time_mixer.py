"""ComfyUI's AlphaBlenders (SVD's time mixers) through the pack's one-kernel blend (blend.py), bit for bit ComfyUI's.

Object-patched `forward` of every AlphaBlender of the diffusion model: ComfyUI's own alpha (`get_alpha`), cast as
ComfyUI casts it, then `blend`.
"""

from typing import Dict

import torch

from ..blend import blend


class TimeMixerForward:
    """Replacement `forward` of one ComfyUI AlphaBlender (not an nn.Module: no state-dict key)."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def __call__(self, x_spatial, x_temporal, image_only_indicator=None):
        alpha = self.module.get_alpha(image_only_indicator, x_spatial.device)
        return blend(alpha.to(x_spatial.dtype), x_spatial, (1.0 - alpha).to(x_spatial.dtype), x_temporal)


def forwards(diffusion_model: torch.nn.Module) -> Dict[str, TimeMixerForward]:
    """{object-patch name: forward} of every ComfyUI AlphaBlender of `diffusion_model`."""
    return {f"diffusion_model.{path}.forward": TimeMixerForward(module)
            for path, module in diffusion_model.named_modules() if comfy_alpha_blender(module)}


def comfy_alpha_blender(module: torch.nn.Module) -> bool:
    forward = getattr(type(module), "forward", None)
    return (type(module).__name__ == "AlphaBlender" and hasattr(module, "get_alpha")
            and getattr(forward, "__module__", "") == "comfy.ldm.modules.diffusionmodules.util")
