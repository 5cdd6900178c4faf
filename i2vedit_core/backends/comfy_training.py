"""Autograd on ComfyUI's SVD: the inference-mode trap and gradient checkpointing (COMFYUI_NOTES 5.1, 5.3).

ComfyUI runs every node under `torch.inference_mode()`, so the loaded UNet's parameters and the
node's input tensors are inference tensors, which autograd may not save for backward. Training
therefore runs inside `torch.inference_mode(False)` and, before the first differentiable forward, the
inference-tensor parameters and buffers are replaced by clones (same values). This is the one place
that touches the shared BaseModel's own attributes (ComfyUI has no extension point for it): the
originals are recorded and put back, the same objects, when training ends, before ModelPatcher
restores what it patched (tests/host/test_comfy_model_untouched.py checks identity, values and
inference-ness afterwards).

Gradient checkpointing wraps the heavy layers of the UNet's blocks (VideoResBlock and
SpatialVideoTransformer, as core TrainLoraNode's `patch` does for top-level children) with
object-patched forwards that checkpoint only while their (resolution level, kind) is switched on
(`memory.checkpointed_layers`, the set the diffusers backend checkpoints too) and autograd is recording.
"""

from contextlib import contextmanager
from typing import Dict, Iterator, List, Tuple

import torch

from ..memory import checkpointed_layers
from ..recompute import recompute
from . import comfy_lora
from .comfy_attention import level_of

HEAVY_LAYERS = {"VideoResBlock": "resblock", "SpatialVideoTransformer": "transformer"}  # class -> memory.LAYER_KINDS


class Switch:
    """Training state of one backend: the checkpointed (level, kind) pairs its object patches read, its LoRA state
    (whose call value a recomputation pins again), and the shared model's inference tensors swapped out
    while training (name -> original object)."""

    def __init__(self, lora: comfy_lora.LoraState):
        self.layers = frozenset()
        self.lora = lora
        self.swapped = {}
        self._slots = None

    def tensor_slots(self, model: torch.nn.Module) -> List[Tuple[str, torch.nn.Module, str, bool]]:
        """`tensor_slots(model)`, listed once: the model's structure does not change while it is trained."""
        if self._slots is None:
            self._slots = tensor_slots(model)
        return self._slots


class CheckpointedForward:
    """Replacement `forward` of one UNet layer: recomputed in backward while its (level, kind) is switched on."""

    def __init__(self, module: torch.nn.Module, layer, switch: Switch, holds_lora: bool = True):
        self.module, self.layer, self.switch, self.holds_lora = module, layer, switch, holds_lora

    def __call__(self, *args, **kwargs):
        forward = type(self.module).forward
        if self.layer in self.switch.layers and torch.is_grad_enabled():
            lora = self.switch.lora
            call = comfy_lora.as_call(comfy_lora.current_call(lora))
            return recompute(recompute_with(forward, lora, call), self.module, *args,
                             holds_trainable=self.holds_lora, **kwargs)
        return forward(self.module, *args, **kwargs)


def recompute_with(forward, lora, call):
    """`forward` run with this UNet call's LoraCall (scale, slot, dropout seed) pinned on `lora`: the
    recomputation in backward happens after the call's wrappers have reset it, maybe on autograd's thread, and
    must draw the forward's dropout masks again."""
    def run(*args, **kwargs):
        with comfy_lora.pinned(lora, call):
            return forward(*args, **kwargs)
    return run


def checkpointed_forwards(diffusion_model, switch: Switch, adaptable) -> Dict[str, CheckpointedForward]:
    """{object-patch name: CheckpointedForward reading `switch`} of every heavy layer (comfy_forwards installs them).
    adaptable: the Linears a motion LoRA may adapt (comfy_lora.adaptable_linears): the layers holding none need no
    recomputation when their inputs need no gradient (recompute's holds_trainable)."""
    per_block, levels = int(diffusion_model.num_res_blocks[0]) + 1, len(diffusion_model.channel_mult)
    adaptable = {id(linear) for linear in adaptable}
    found = {}
    for path, module in diffusion_model.named_modules():
        kind = HEAVY_LAYERS.get(type(module).__name__)
        if kind and path.startswith(("input_blocks.", "middle_block.", "output_blocks.")):
            holds_lora = any(id(m) in adaptable for m in module.modules())
            layer = (level_of(path, per_block, levels), kind)
            found[f"diffusion_model.{path}.forward"] = CheckpointedForward(module, layer, switch, holds_lora)
    return found


def trainable_now() -> bool:
    """True when a forward may be differentiated (grad on, not in inference mode)."""
    return torch.is_grad_enabled() and not torch.is_inference_mode_enabled()


def tensor_slots(model: torch.nn.Module) -> List[Tuple[str, torch.nn.Module, str, bool]]:
    """(qualified name, owning module, attribute, is a parameter) of each distinct parameter and buffer: a flat
    list, so that the check at every training step is one loop, not a walk of the UNet's ~2000 modules."""
    slots, seen = [], set()
    for path, module in model.named_modules():
        for kind, tensors in ((True, module._parameters), (False, module._buffers)):
            for attr, tensor in tensors.items():
                if tensor is not None and id(tensor) not in seen:
                    seen.add(id(tensor))
                    slots.append((f"{path}.{attr}" if path else attr, module, attr, kind))
    return slots


def replace_inference_tensors(model: torch.nn.Module, swapped: dict, slots) -> int:
    """Swap inference-tensor parameters and buffers of `model` for normal clones, recording the originals
    in `swapped` (put back by `restore_inference_tensors`); returns how many were swapped now. slots:
    `tensor_slots(model)`.

    Why it stays (the pack's one write to the shared BaseModel's attributes, through `comfy.utils.set_attr_param`
    / `set_attr`): autograd cannot save an inference tensor for backward, a loader under inference mode makes
    every weight one, and ComfyUI has no extension point that hands a forward other weights (object patches
    replace methods, weight patches are merged into the same inference tensors). Only tensors that are
    inference tensors are swapped, only while training, and the same objects go back afterwards
    (tests/host/test_comfy_model_untouched.py)."""
    import comfy.utils

    count = 0
    for name, module, attr, is_parameter in slots:
        tensor = getattr(module, attr)
        if tensor is not None and tensor.is_inference():
            swapped.setdefault(name, tensor)
            (comfy.utils.set_attr_param if is_parameter else comfy.utils.set_attr)(model, name, tensor.clone())
            count += 1
    return count


def restore_inference_tensors(model: torch.nn.Module, swapped: dict) -> None:
    """Put the recorded original objects back (comfy.utils.set_attr keeps the object, unlike set_attr_param)."""
    import comfy.utils

    for name, original in swapped.items():
        comfy.utils.set_attr(model, name, original)
    swapped.clear()


def normal(t: torch.Tensor) -> torch.Tensor:
    """`t`, cloned if it is an inference tensor and autograd may need to save it."""
    return t.clone() if t.is_inference() and trainable_now() else t


@contextmanager
def training_mode(lora_state, switch: Switch, gradient_checkpointing, levels: int, model) -> Iterator[None]:
    """Inference mode off, LoRA dropout active, checkpointing switched as asked; all restored after."""
    import comfy.model_management as mm

    had_flag = hasattr(mm, "in_training")  # newer ComfyUI switches to out-of-place ops with it
    previous = (lora_state.dropout_active, switch.layers, getattr(mm, "in_training", None))
    lora_state.dropout_active, switch.layers = True, checkpointed_layers(levels, gradient_checkpointing)
    if had_flag:
        mm.in_training = True
    try:
        with torch.inference_mode(False):
            yield
    finally:
        lora_state.dropout_active, switch.layers = previous[0], previous[1]
        restore_inference_tensors(model, switch.swapped)
        if had_flag:
            mm.in_training = previous[2]
