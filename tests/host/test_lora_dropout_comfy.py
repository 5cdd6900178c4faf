"""The ComfyUI activation-space adapter puts LoRA dropout on the branch output, dropout(up(down(x))),
as the official LoRA and the diffusers backend do (issue 12; core twin: tests/test_lora_dropout.py).

The Linear is ComfyUI's own op class (what its SVD UNet is built from); the patch is the callable the
backend installs on its clone. The mask is fixed by seeding the global RNG, dropout's source.
"""

import torch

from i2vedit_core.backends import comfy_lora
from i2vedit_core.lora import LoraSpec, motion_lora_from_pairs

P = 0.5
PATH = "input_blocks.1.1.time_stack.0.attn1.to_q"


def test_comfy_dropout_acts_on_the_branch_output():
    import comfy.ops

    torch.manual_seed(0)
    module = comfy.ops.disable_weight_init.Linear(6, 10, bias=True)
    with torch.no_grad():
        module.weight.normal_(), module.bias.normal_()
    spec = LoraSpec(rank=4, dropout=P, attn1_only=True)
    gen = torch.Generator().manual_seed(3)
    down, up = torch.randn(4, 6, generator=gen), torch.randn(10, 4, generator=gen)
    state = comfy_lora.LoraState()
    comfy_lora.load(state, {PATH: module}, motion_lora_from_pairs({PATH: (down, up)}, spec), torch.device("cpu"))
    forward = comfy_lora.LoraForward(module, PATH, state)
    x = torch.randn(3, 5, 6, generator=gen)
    with torch.no_grad():
        base, branch = module(x), x @ down.T @ up.T
        state.dropout_active = True  # what the backend's lora_training() switches on
        torch.manual_seed(7)
        out = forward(x)
        torch.manual_seed(7)
        mask = torch.nn.functional.dropout(torch.ones(branch.shape), P, training=True)
        torch.testing.assert_close(out, base + branch * mask, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(out, base + branch, atol=1e-3)  # the mask dropped something
        state.dropout_active = False
        torch.testing.assert_close(forward(x), base + branch, rtol=1e-5, atol=1e-5)


def test_comfy_clip0_slot_is_a_second_weight_set_chosen_per_call():
    """Exact skip-interval: clip 0's LoRA beside the clip's own, run by calls whose slot is "clip0"."""
    import comfy.ops

    torch.manual_seed(1)
    module = comfy.ops.disable_weight_init.Linear(6, 10, bias=False)
    with torch.no_grad():
        module.weight.normal_()
    spec = LoraSpec(rank=2, attn1_only=True)
    gen = torch.Generator().manual_seed(4)
    pairs = [{PATH: (torch.randn(2, 6, generator=gen), torch.randn(10, 2, generator=gen))} for _ in range(2)]
    state = comfy_lora.LoraState()
    comfy_lora.load(state, {PATH: module}, motion_lora_from_pairs(pairs[1], spec), torch.device("cpu"))
    comfy_lora.load(state, {PATH: module}, motion_lora_from_pairs(pairs[0], spec), torch.device("cpu"), slot="clip0")
    forward = comfy_lora.LoraForward(module, PATH, state)
    x = torch.randn(4, 6, generator=gen)
    with torch.no_grad():
        base = module(x)
        expected = [base + x @ down.T @ up.T for down, up in (p[PATH] for p in pairs)]
        torch.testing.assert_close(forward(x), expected[1], rtol=1e-5, atol=1e-5)
        with comfy_lora.lora_call((1.0, "clip0")):
            torch.testing.assert_close(forward(x), expected[0], rtol=1e-5, atol=1e-5)
        with comfy_lora.lora_call((0.5, "clip0")):  # the call's scale, absolute
            torch.testing.assert_close(forward(x), (base + expected[0]) / 2, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(forward(x), expected[1], rtol=1e-5, atol=1e-5)  # the slot ended with the call
        state.clear()
        with comfy_lora.lora_call((1.0, "clip0")):
            torch.testing.assert_close(forward(x), base)  # detaching removes both slots


def test_checkpointed_recompute_runs_with_the_calls_lora_scale():
    """Gradient checkpointing recomputes a layer in backward, after the UNet call (and its LoRA scale) has ended:
    the recomputation must run with that call's scale, or the LoRA's gradients come out for another scale."""
    import comfy.ops

    from i2vedit_core.backends import comfy_training

    torch.manual_seed(2)
    # Tanh inside the checkpointed block saves its output, which depends on the scale: recomputed, it must match.
    block = torch.nn.Sequential(comfy.ops.disable_weight_init.Linear(6, 6, bias=False), torch.nn.Tanh())
    with torch.no_grad():
        block[0].weight.normal_()
    spec = LoraSpec(rank=2, attn1_only=True)
    state = comfy_lora.LoraState()
    comfy_lora.attach(state, {PATH: block[0]}, spec, torch.device("cpu"), torch.Generator().manual_seed(0))
    with torch.no_grad():
        state.up[PATH].normal_()
    block[0].forward = comfy_lora.LoraForward(block[0], PATH, state)
    switch = comfy_training.Switch(state)
    layer = comfy_training.CheckpointedForward(block, (0, "transformer"), switch)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))

    def grads(layers):
        switch.layers = layers
        for p in state.parameters():
            p.grad = None
        with comfy_lora.lora_call((0.5, "clip")):
            y = layer(x)
        y.pow(2).sum().backward()  # outside the call, as training's loss.backward() is
        return [p.grad.clone() for p in state.parameters()]

    plain, recomputed = grads(frozenset()), grads(frozenset({(0, "transformer")}))
    assert all(float(g.abs().max()) > 1e-4 for g in plain)
    for a, b in zip(plain, recomputed):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
