"""The ComfyUI backend's LoRA Linears under torch.compile, without ComfyUI (plain torch Linears stand in
for ComfyUI's ops). While training compiles the UNet, an APPLY_MODEL wrapper outside the compiled module
pins the call's (scale, slot) on the LoRA state (comfy_lora.pin_lora_call), so the compiled code reads no
ContextVar: torch <= 2.13 cannot trace ContextVar.get, and a graph break at each of the 192 Linears made
the compiled training step slower than eager on an H200."""

import torch

from i2vedit_core.backends import comfy_lora
from i2vedit_core.lora import LoraSpec

PATH = "input_blocks.1.1.time_stack.0.attn1.to_q"


def block_with_lora():
    torch.manual_seed(2)
    block = torch.nn.Sequential(torch.nn.Linear(6, 6, bias=False), torch.nn.Tanh(), torch.nn.Linear(6, 6))
    state = comfy_lora.LoraState()
    linears = {PATH: block[0], PATH.replace("to_q", "to_k"): block[2]}
    comfy_lora.attach(state, linears, LoraSpec(rank=2, attn1_only=True), torch.device("cpu"),
                      torch.Generator().manual_seed(0))
    with torch.no_grad():
        for up in state.up.values():
            up.normal_()
    for path, linear in linears.items():
        linear.forward = comfy_lora.LoraForward(linear, path, state)
    return block, state


def test_compiled_linears_read_the_pinned_call_without_a_graph_break():
    from torch._dynamo.utils import counters

    block, state = block_with_lora()
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    values = [(0.0, "clip"), (1.0, "clip"), (0.5, "clip")]
    pin = comfy_lora.pin_lora_call(state)
    options = lambda value: {comfy_lora.LORA_KEY: value}  # noqa: E731  transformer_options of one call
    with torch.no_grad():
        eager = []
        for value in values:
            with comfy_lora.lora_call(value):  # what the DIFFUSION_MODEL wrapper does, uncompiled
                eager.append(block(x))
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(block, backend="eager")
        for value, expected in zip(values, eager):
            out = pin(lambda *args: compiled(x), x, None, None, None, None, options(value))
            torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert not torch.equal(eager[0], eager[1]) and not torch.equal(eager[1], eager[2])
    assert not counters["graph_break"], list(counters["graph_break"])
    assert state.pinned is None and comfy_lora.CALL.get() == comfy_lora.OUTSIDE_A_CALL  # nothing outlives a call
