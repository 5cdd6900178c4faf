"""Activation checkpointing of one UNet layer, as both backends' memory tiers use it (memory.checkpointed_layers).

torch.utils.checkpoint's non-reentrant form hooks every tensor the layer saves for backward, and the
checkpointed training step is host-bound (docs/PERFORMANCE.md, run 5). The reentrant form runs the layer's
forward without autograd and once more in backward, with no per-tensor hooks. Its catch: backward reaches
the layer only if one of its inputs requires grad, and a layer before the first trainable one (the motion LoRA
sits inside) gets inputs that do not, so its LoRA would silently get no gradient. There an empty anchor
tensor that requires grad is passed along, and an alias of it returned as one more output, so that the
checkpoint is part of the graph and its recomputation has an output to differentiate either way.

Tensor keyword arguments are passed positionally, so that they are inputs of the checkpoint (the reentrant
form takes no keywords). Inside torch.compile the non-reentrant form is used: dynamo traces only that one.
While a CUDA graph is being captured (training_graph.py) no RNG state is saved or restored (a capture cannot
read or set the device's): the layers recomputed then draw nothing on the host, since the fused LoRA dropout
keys on the UNet call's device seed (branch_dropout.py), and backends whose recomputation needs the RNG
restored are not captured with checkpointing (their `capturable_training`).

What the reentrant form asks of its callers: a layer returns a tensor or a flat tuple (autograd tracks a
Function's top-level tensors only: anything nested would silently get no gradient, so it is refused); the
layer does not branch on grad mode (its first run is without autograd); training calls loss.backward(), not
torch.autograd.grad.
"""

import torch
from torch.utils.checkpoint import checkpoint

from .training_graph import is_capturing

# The non-reentrant form's default check compares every recomputed tensor's shape, dtype and device with the
# saved one: host time per tensor. The recomputation is the same code on the same inputs with the RNG restored.
CHECKPOINT_DETERMINISM_CHECK = "none"


def recompute(function, *args, holds_trainable: bool = True, **kwargs):
    """function(*args, **kwargs) with its activations recomputed in backward, not kept.

    holds_trainable: the layer may hold trainable weights (a transformer with the motion LoRA; a ResBlock never
    does). A layer without any, whose inputs need no gradient either, simply runs: autograd saves nothing there.
    """
    if torch.compiler.is_compiling():
        return checkpoint(function, *args, use_reentrant=False, determinism_check=CHECKPOINT_DETERMINISM_CHECK,
                          **kwargs)
    tensor_names = [name for name, value in kwargs.items() if isinstance(value, torch.Tensor)]
    others = {name: value for name, value in kwargs.items() if name not in tensor_names}
    inputs = (*args, *(kwargs[name] for name in tensor_names))
    positional = len(args)

    def call(flat):
        return _flat(function(*flat[:positional], **others, **dict(zip(tensor_names, flat[positional:]))))

    preserve_rng = not is_capturing()
    if any(isinstance(value, torch.Tensor) and value.requires_grad for value in inputs):
        return checkpoint(lambda *flat: call(flat), *inputs, use_reentrant=True, preserve_rng_state=preserve_rng)
    if not holds_trainable:
        return function(*args, **kwargs)
    returned_tuple = []

    def anchored(anchor, *flat):
        out = call(flat)
        returned_tuple[:] = [isinstance(out, tuple)]
        # One flat tuple of tensors: autograd tracks a Function's tensor outputs only, not nested tuples.
        return (*out, anchor + 0) if returned_tuple[0] else (out, anchor + 0)

    outputs = checkpoint(anchored, torch.empty(0, requires_grad=True), *inputs, use_reentrant=True,
                         preserve_rng_state=preserve_rng)
    return outputs[:-1] if returned_tuple[0] else outputs[0]


def _flat(out):
    if isinstance(out, torch.Tensor) or (isinstance(out, tuple)
                                         and not any(isinstance(item, (tuple, list, dict)) for item in out)):
        return out
    raise TypeError(f"a checkpointed layer must return a tensor or a flat tuple (nested outputs would get no "
                    f"gradient), got {type(out).__name__}: call it with return_dict=False")
