"""ComfyUI's LayerNorms and GEGLUs of the UNet through the pack's training kernels (layer_norm.py, geglu.py).

Object-patched `forward`s. Both differ from ComfyUI's own only under autocast (a training step's mixed precision):
a LayerNorm with frozen weights writes the activations' dtype (norm_precision.py), a GEGLU is one kernel; an edit's
or an inversion's forward runs PyTorch's ops as ComfyUI would. Where ComfyUI casts or patches a
LayerNorm's weights at each call, its own forward runs.
"""

from typing import Dict

import torch

from ..geglu import GegluForward
from ..layer_norm import LayerNormForward
from .comfy_group_norm import casts_per_call


class ComfyLayerNorm(LayerNormForward):
    """LayerNormForward, except where ComfyUI casts or patches the module's weights at each call."""

    def __call__(self, input):
        return type(self.module).forward(self.module, input) if casts_per_call(self.module) else super().__call__(input)


def forwards(diffusion_model: torch.nn.Module) -> Dict[str, object]:
    """{object-patch name: forward} of every plain LayerNorm and GEGLU of `diffusion_model`."""
    patches = {}
    for path, module in diffusion_model.named_modules():
        if plain_layer_norm(module):
            patches[f"diffusion_model.{path}.forward"] = ComfyLayerNorm(module)
        elif comfy_geglu(module):
            patches[f"diffusion_model.{path}.forward"] = GegluForward(module)
    return patches


def plain_layer_norm(module: torch.nn.Module) -> bool:
    """torch's LayerNorm or ComfyUI's ops.LayerNorm (which runs torch's); not a subclass with a forward of its own."""
    forward = getattr(type(module), "forward", None)
    return isinstance(module, torch.nn.LayerNorm) and (
        forward is torch.nn.LayerNorm.forward or getattr(forward, "__module__", "") == "comfy.ops")


def comfy_geglu(module: torch.nn.Module) -> bool:
    """ComfyUI's GEGLU itself (x, gate = proj(x).chunk(2); x * gelu(gate)), not a subclass."""
    forward = getattr(type(module), "forward", None)
    return (type(module).__name__ == "GEGLU" and hasattr(module, "proj")
            and getattr(forward, "__module__", "") == "comfy.ldm.modules.attention")
