"""LoRA dropout sits on the branch output, dropout(up(down(x))), as the official LoRA has it (issue 12).

The mask is fixed by seeding the global RNG (dropout's source) before the forward and drawing the
same Bernoulli mask on a tensor of the branch output's shape. peft's placement, up(down(dropout(x))),
draws a mask of the input's shape instead and fails both checks.
"""

import torch

from i2vedit_core.backends import diffusers_lora
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
    with torch.no_grad(), diffusers_lora.lora_training(unet):
        torch.manual_seed(7)
        out = layer(x)
        expected = base(x) + (x @ branch.T) * output_mask((3, 5, layer.out_features), 7)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, base(x) + x @ branch.T, atol=1e-3)  # the mask really dropped something
    with torch.no_grad():  # outside training: no dropout
        torch.testing.assert_close(layer(x), base(x) + x @ branch.T, rtol=1e-5, atol=1e-5)
    assert diffusers_lora.attached_spec(unet).dropout == P
    assert name in diffusers_lora.lora_layers(unet)
