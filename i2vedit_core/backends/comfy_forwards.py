"""One set of object-patch forwards per diffusion model, shared by every ComfyBackend built on it.

Each ComfyUI prompt builds its own ComfyBackend on a clone of the MODEL (nodes/host.py). If each backend made
its own forwards (attn1 control, the LoRA Linears, the checkpointed layers, the one-key attn2, the GroupNorms), a
compiled UNet would compile again at every prompt: dynamo guards on the identity of each module's `forward`, and
compiled code is cached per code object for the whole process (tests/host/test_comfy_compile_again.py). So the
forwards are made once per diffusion model and every backend object-patches the same objects on its own clone; a
backend points them at its own LoRA state and checkpointing switch (`bind`) before its UNet calls. Pointing the
same object at another state does not recompile (dynamo checks that state's type and contents, not its identity).

Decision (docs/PERFORMANCE.md, run 9): the pack's one process-wide cache of objects. It is weak on the diffusion
model, whose own submodules are all it holds besides the bound backend's state (a released backend unbinds: the
forwards then read an empty state and pass straight through), so a model ComfyUI frees takes its forwards with it,
and a reloaded checkpoint gets new ones (and compiles again). dynamo keeps at most `recompile_limit` (8) versions
per code object for the whole session: after that many frame counts, sizes, ranks or memory tiers, compiled
training runs eagerly.
"""

import weakref
from typing import Dict

import torch

from . import (comfy_attention, comfy_cross_attention, comfy_group_norm, comfy_lora, comfy_training,
               comfy_training_layers)

FORWARDS: "weakref.WeakKeyDictionary[torch.nn.Module, SharedForwards]" = weakref.WeakKeyDictionary()


class SharedForwards:
    """The forwards of one diffusion model ({object-patch name: forward}) and the backend state they read now."""

    def __init__(self, diffusion_model: torch.nn.Module):
        self.attn1 = comfy_attention.attn1_modules(diffusion_model)
        self.linears = comfy_lora.adaptable_linears(diffusion_model)
        lora, switch = unbound_state()
        self.lora = comfy_lora.forwards(self.linears, lora)
        self.layers = comfy_training.checkpointed_forwards(diffusion_model, switch, self.linears.values())
        self.patches: Dict[str, object] = {**comfy_attention.forwards(self.attn1), **self.lora, **self.layers}
        # Faster layers, with the same numbers in an edit (in training: norm_precision.py, geglu.py): kept off a
        # forward another pack already object-patched.
        self.optional: Dict[str, object] = {**comfy_cross_attention.forwards(diffusion_model),
                                            **comfy_group_norm.forwards(diffusion_model),
                                            **comfy_training_layers.forwards(diffusion_model)}
        self.bound = switch

    def install(self, patcher) -> None:
        """Object-patch every forward on `patcher` (a clone), plus the LoRA's per-call wrapper; the faster layers only
        where no other pack object-patched that forward."""
        for name, forward in self.patches.items():
            patcher.add_object_patch(name, forward)
        for name, forward in self.optional.items():
            if patcher.object_patches.get(name, forward) is forward:
                patcher.add_object_patch(name, forward)
        comfy_lora.install_call_scope(patcher)

    def bind(self, switch: comfy_training.Switch) -> None:
        """Point the forwards at `switch` and its LoRA state (a backend's), if they are not already."""
        if switch is self.bound:
            return
        for forward in self.lora.values():
            forward.state = switch.lora
        for forward in self.layers.values():
            forward.switch = switch
        self.bound = switch

    def unbind(self, switch: comfy_training.Switch) -> None:
        """Let go of `switch` (a released backend's) if the forwards read it: they read an empty state instead."""
        if switch is self.bound:
            self.bind(unbound_state()[1])


def unbound_state():
    lora = comfy_lora.LoraState()
    return lora, comfy_training.Switch(lora)


def shared_forwards(diffusion_model: torch.nn.Module) -> SharedForwards:
    """The forwards of `diffusion_model`, made on first use."""
    forwards = FORWARDS.get(diffusion_model)
    if forwards is None:
        forwards = FORWARDS[diffusion_model] = SharedForwards(diffusion_model)
    return forwards
