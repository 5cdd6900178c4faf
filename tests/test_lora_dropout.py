"""LoRA dropout sits on the branch output, dropout(up(down(x))), as the official LoRA has it (issue 12).

The mask is fixed by seeding the global RNG (dropout's source) before the forward and drawing the
same Bernoulli mask on a tensor of the branch output's shape. peft's placement, up(down(dropout(x))),
draws a mask of the input's shape instead and fails both checks.
"""

import torch

from interpreted import run_interpreted
from i2vedit_core.backends import diffusers_lora
from i2vedit_core.branch_dropout import CallSeeds
from i2vedit_core.lora import LoraSpec
from i2vedit_core.tiny import tiny_unet

P = 0.5


def output_mask(shape, seed: int) -> torch.Tensor:
    """What dropout of an output of `shape` multiplies it by under torch.manual_seed(seed): 0 or 1/(1-p)."""
    torch.manual_seed(seed)
    return torch.nn.functional.dropout(torch.ones(shape), P, training=True)


def test_diffusers_dropout_acts_on_the_branch_output():
    unet = tiny_unet(seed=0)
    diffusers_lora.attach_lora(unet, LoraSpec(rank=4, dropout=P), torch.Generator().manual_seed(1))
    name, layer = next((n, m) for n, m in diffusers_lora.lora_layers(unet).items() if n.endswith("attn1.to_q"))
    down, up = layer.lora_A[diffusers_lora.ADAPTER], layer.lora_B[diffusers_lora.ADAPTER]
    with torch.no_grad():
        up.weight.copy_(torch.randn(up.weight.shape, generator=torch.Generator().manual_seed(2)))
    x = torch.randn(3, 5, layer.in_features, generator=torch.Generator().manual_seed(3))
    base = layer.get_base_layer()
    branch = up.weight @ down.weight  # (out, in): up(down(x)) = x @ branch.T
    with torch.no_grad(), diffusers_lora.lora_training(unet, CallSeeds()):
        torch.manual_seed(7)
        out = layer(x)
        expected = base(x) + (x @ branch.T) * output_mask((3, 5, layer.out_features), 7)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, base(x) + x @ branch.T, atol=1e-3)  # the mask really dropped something
    with torch.no_grad():  # outside training: no dropout
        torch.testing.assert_close(layer(x), base(x) + x @ branch.T, rtol=1e-5, atol=1e-5)
    assert diffusers_lora.attached_spec(unet).dropout == P
    assert name in diffusers_lora.lora_layers(unet)


def test_training_forward_is_pefts_sum():
    """FusedDropoutForward (training) computes what peft's forward does: with dropout off, at another scale, with
    gradients; peft's forward runs where it does not apply (clip 0's adapter active)."""
    unet = tiny_unet(seed=0)
    diffusers_lora.attach_lora(unet, LoraSpec(rank=4, dropout=0.0), torch.Generator().manual_seed(1))
    layers = list(diffusers_lora.lora_layers(unet).values())
    with torch.no_grad():
        for layer in layers:
            layer.lora_B[diffusers_lora.ADAPTER].weight.normal_()
    layer = layers[3]
    x = torch.randn(2, 6, layer.in_features, generator=torch.Generator().manual_seed(3))

    def run(training, scale):
        for p in diffusers_lora.lora_parameters(unet):
            p.grad = None
        with diffusers_lora.use_lora_scale(unet, scale):
            if training:
                with diffusers_lora.lora_training(unet, CallSeeds()):
                    assert isinstance(vars(layer)["forward"], diffusers_lora.FusedDropoutForward)
                    out = layer(x)
            else:
                out = layer(x)
        out.pow(2).sum().backward()
        down, up = layer.lora_A[diffusers_lora.ADAPTER].weight, layer.lora_B[diffusers_lora.ADAPTER].weight
        return out.detach(), down.grad.clone(), up.grad.clone()

    for scale in (1.0, 0.6):
        for fused, peft in zip(run(True, scale), run(False, scale)):
            torch.testing.assert_close(fused, peft, rtol=1e-5, atol=1e-5)
    assert not any("forward" in vars(m) for m in layers), "training forwards left behind"
    fused = run(True, 1.0)[0]
    with torch.no_grad():
        assert not torch.allclose(fused, layer.get_base_layer()(x), atol=1e-3)  # the branch contributes


_INTERPRETED_DIFFUSERS_RECOMPUTE = """
import json, sys, torch
from i2vedit_core import recompute
from i2vedit_core.backends import diffusers_checkpointing
from i2vedit_core.lora import LoraSpec
from i2vedit_core.tiny import tiny_backend
from i2vedit_core import group_norm
group_norm.SPLIT_BELOW_ROWS = 0  # its kernels: test_group_norm.py (interpreted in a whole UNet: minutes)
recompute.is_capturing = lambda: True  # as inside a CUDA graph capture: no RNG state saved or restored
if sys.argv[1] == "unpinned":  # the mutant: a recomputation that does not set the call's seed again
    class Fresh:
        def __init__(self, seeds): self.seeds = seeds
        current = property(lambda self: None)
        def call(self, seed=None): return self.seeds.call(None)
    original = diffusers_checkpointing._checkpointed
    diffusers_checkpointing._checkpointed = lambda module, forward, seeds: original(module, forward, Fresh(seeds))
backend = tiny_backend(seed=0)
backend.attach_lora(LoraSpec(rank=4, dropout=0.5), torch.Generator().manual_seed(1))
params = backend.lora_parameters()
with torch.no_grad():
    for p in params[1::2]:
        p.normal_()
from i2vedit_core.backends.base import Conditioning
g = torch.Generator().manual_seed(2)
x = torch.randn(1, 3, 4, 8, 8, generator=g)
cond = Conditioning(torch.randn(1, 1, 32, generator=g), torch.randn(1, 3, 4, 8, 8, generator=g),
                    torch.tensor([[6.0, 127.0, 0.02]]))
grads = {}
for setting in (False, True):
    for p in params:
        p.grad = None
    torch.manual_seed(5)  # the call's dropout seed is drawn from the device RNG (here the CPU's)
    with backend.lora_training(setting):
        backend.denoise(x, 0.7, cond).pow(2).mean().backward()
    grads[setting] = torch.cat([p.grad.flatten() for p in params if p.grad is not None])  # attn2 q, k: none
print(json.dumps(dict(diff=float((grads[True] - grads[False]).abs().max() / grads[False].abs().max()))))
"""


def test_checkpointed_layers_redraw_the_calls_masks_without_rng_state():
    """Checkpointed training with the fused kernel (Triton's interpreter on the CPU) and no RNG state restored, as
    in a captured step: the recomputation sets the call's seed again, so the LoRA gradients equal the plain
    step's. The mutant whose recomputation draws a fresh seed gets other masks, and other gradients."""
    import pytest

    pytest.importorskip("triton")
    assert run_interpreted(_INTERPRETED_DIFFUSERS_RECOMPUTE, "pinned")["diff"] < 1e-5
    assert run_interpreted(_INTERPRETED_DIFFUSERS_RECOMPUTE, "unpinned")["diff"] > 1e-2
