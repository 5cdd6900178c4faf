"""The ComfyUI backend's LoRA Linears under torch.compile, without ComfyUI (plain torch Linears stand in
for ComfyUI's ops): the heavy layer pins the call's (scale, slot) on the LoRA state, so the compiled layer
reads no ContextVar. torch <= 2.13 cannot trace ContextVar.get: reading it in the Linear made a graph break
at each of the 192 Linears, and the compiled training step slower than eager on an H200."""

import torch

from i2vedit_core.backends import comfy_lora, comfy_training
from i2vedit_core.lora import LoraSpec

PATH = "input_blocks.1.1.time_stack.0.attn1.to_q"


def block_with_lora():
    torch.manual_seed(2)
    block = torch.nn.Sequential(torch.nn.Linear(6, 6, bias=False), torch.nn.Tanh())
    state = comfy_lora.LoraState()
    comfy_lora.attach(state, {PATH: block[0]}, LoraSpec(rank=2, attn1_only=True), torch.device("cpu"),
                      torch.Generator().manual_seed(0))
    with torch.no_grad():
        state.up[PATH].normal_()
    block[0].forward = comfy_lora.LoraForward(block[0], PATH, state)
    return block, state


def test_compiled_heavy_layer_reads_the_pinned_call_without_a_graph_break():
    from torch._dynamo.utils import counters

    block, state = block_with_lora()
    switch = comfy_training.Switch(state)
    layer = comfy_training.HeavyLayerForward(block, 0, switch)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        eager = {}
        for value in [(0.0, "clip"), (1.0, "clip"), (0.5, "clip")]:
            with comfy_lora.lora_call(value):
                eager[value] = layer(x)
        torch._dynamo.reset()
        counters.clear()
        with switch.compiling({torch.nn.Sequential}, "eager"):
            for value, expected in eager.items():
                with comfy_lora.lora_call(value):
                    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
    assert not torch.equal(eager[(0.0, "clip")], eager[(1.0, "clip")])
    assert not counters["graph_break"], list(counters["graph_break"])
    assert state.pinned is None and comfy_lora.CALL.get() == comfy_lora.OUTSIDE_A_CALL  # nothing outlives a call
