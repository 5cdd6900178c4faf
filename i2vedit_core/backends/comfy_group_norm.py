"""ComfyUI's GroupNorm layers of the UNet through the pack's split-statistics GroupNorm (group_norm.py).

Object-patched `forward` of every GroupNorm module of the diffusion model (ComfyUI's `ops.GroupNorm` and the
transformers' `torch.nn.GroupNorm`). Where ComfyUI casts or patches the weights at each call (`comfy_cast_weights`
when a model is partly offloaded, weight or bias functions of other nodes), its own forward runs.
"""

from typing import Dict

import torch

from ..group_norm import GroupNormForward


class SplitStatisticsGroupNorm(GroupNormForward):
    """GroupNormForward, except where ComfyUI casts or patches the module's weights at each call."""

    def __call__(self, input):
        return type(self.module).forward(self.module, input) if casts_per_call(self.module) else super().__call__(input)


def casts_per_call(module: torch.nn.Module) -> bool:
    """Whether ComfyUI casts or patches the module's weights at each call (its own forward must run then)."""
    return bool(getattr(module, "comfy_cast_weights", False) or getattr(module, "weight_function", None)
                or getattr(module, "bias_function", None))


def forwards(diffusion_model: torch.nn.Module) -> Dict[str, SplitStatisticsGroupNorm]:
    """{object-patch name: forward} of every GroupNorm of `diffusion_model`."""
    return {f"diffusion_model.{path}.forward": SplitStatisticsGroupNorm(module)
            for path, module in diffusion_model.named_modules() if plain_group_norm(module)}


def plain_group_norm(module: torch.nn.Module) -> bool:
    """torch's GroupNorm or ComfyUI's ops.GroupNorm (which runs torch's); not a subclass with a forward of its own."""
    forward = getattr(type(module), "forward", None)
    return isinstance(module, torch.nn.GroupNorm) and (
        forward is torch.nn.GroupNorm.forward or getattr(forward, "__module__", "") == "comfy.ops")
