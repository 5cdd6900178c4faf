"""Autograd on ComfyUI's SVD: the inference-mode trap and gradient checkpointing (COMFYUI_NOTES 5.1, 5.3).

ComfyUI runs every node under `torch.inference_mode()`, so the loaded UNet's parameters and the
node's input tensors are inference tensors, which autograd may not save for backward. Training
therefore runs inside `torch.inference_mode(False)` and, before each differentiable forward, the
inference-tensor parameters and buffers are replaced by clones (same values; harmless for the
shared model, and ModelPatcher's weight backups still restore what it patched).

Gradient checkpointing wraps the heavy layers of the UNet's blocks (VideoResBlock and
SpatialVideoTransformer, as core TrainLoraNode's `patch` does for top-level children) with
object-patched forwards that checkpoint only while their resolution level is switched on
(`memory.checkpointed_levels`, the set the diffusers backend checkpoints too) and autograd is recording.
"""

from contextlib import contextmanager
from typing import Iterator

import torch
from torch.utils.checkpoint import checkpoint

from ..memory import checkpointed_levels
from .comfy_attention import level_of

HEAVY_LAYERS = ("VideoResBlock", "SpatialVideoTransformer")


class Switch:
    """The checkpointed levels the object patches of one backend read (the patches are per backend clone)."""

    def __init__(self):
        self.levels = frozenset()


class CheckpointedForward:
    """Replacement `forward` of one UNet layer: recomputed in backward while its level is switched on."""

    def __init__(self, module: torch.nn.Module, level: int, switch: Switch):
        self.module, self.level, self.switch = module, level, switch

    def __call__(self, *args, **kwargs):
        forward = type(self.module).forward
        if self.level in self.switch.levels and torch.is_grad_enabled():
            return checkpoint(forward, self.module, *args, use_reentrant=False, **kwargs)
        return forward(self.module, *args, **kwargs)


def install_checkpointing(patcher, diffusion_model, switch: Switch) -> None:
    per_block, levels = int(diffusion_model.num_res_blocks[0]) + 1, len(diffusion_model.channel_mult)
    for path, module in diffusion_model.named_modules():
        if type(module).__name__ in HEAVY_LAYERS and path.startswith(("input_blocks.", "middle_block.", "output_blocks.")):
            forward = CheckpointedForward(module, level_of(path, per_block, levels), switch)
            patcher.add_object_patch(f"diffusion_model.{path}.forward", forward)


def trainable_now() -> bool:
    """True when a forward may be differentiated (grad on, not in inference mode)."""
    return torch.is_grad_enabled() and not torch.is_inference_mode_enabled()


def replace_inference_tensors(model: torch.nn.Module) -> int:
    """Swap inference-tensor parameters and buffers of `model` for normal clones; returns how many."""
    import comfy.utils

    swapped = 0
    for name, p in list(model.named_parameters()):
        if p.is_inference():
            comfy.utils.set_attr_param(model, name, p.clone())
            swapped += 1
    for name, b in list(model.named_buffers()):
        if b.is_inference():
            comfy.utils.set_attr(model, name, b.clone())
            swapped += 1
    return swapped


def normal(t: torch.Tensor) -> torch.Tensor:
    """`t`, cloned if it is an inference tensor and autograd may need to save it."""
    return t.clone() if t.is_inference() and trainable_now() else t


@contextmanager
def training_mode(lora_state, switch: Switch, gradient_checkpointing, levels: int) -> Iterator[None]:
    """Inference mode off, LoRA dropout active, checkpointing switched as asked; all restored after."""
    import comfy.model_management as mm

    had_flag = hasattr(mm, "in_training")  # newer ComfyUI switches to out-of-place ops with it
    previous = (lora_state.dropout_active, switch.levels, getattr(mm, "in_training", None))
    lora_state.dropout_active, switch.levels = True, checkpointed_levels(levels, gradient_checkpointing)
    if had_flag:
        mm.in_training = True
    try:
        with torch.inference_mode(False):
            yield
    finally:
        lora_state.dropout_active, switch.levels = previous[0], previous[1]
        if had_flag:
            mm.in_training = previous[2]
