"""base + dropout(branch) (branch_dropout.py): the fused Triton kernel against its definition, and the
unfused form elsewhere.

The kernel keeps no mask: backward draws it again from the forward's seed. What would go wrong, and where
it shows: a backward mask that differs from the forward's (the gradient check against the mask read off
the forward output), a wrong keep rate or scale (the forward check), quarters of a program sharing random
numbers (the quarters check), two Linears of one call sharing a mask (the sites check), a seed a checkpointed
recomputation does not redraw (the checkpoint check), a seed kept as a number once drawn instead of read from
its device tensor at each launch (the rewritten-seed check: a CUDA graph replays with the tensor redrawn).
"""

import os

import pytest
import torch
import torch.nn.functional as F

from interpreted import run_interpreted
from i2vedit_core import branch_dropout


def test_unfused_form_is_base_plus_dropout_of_the_branch():
    base, branch = torch.randn(2, 7, 16), torch.randn(2, 7, 16)
    torch.manual_seed(3)
    out = branch_dropout.add_dropped(base, branch, 0.25)
    torch.manual_seed(3)
    torch.testing.assert_close(out, base + F.dropout(branch, 0.25, training=True), rtol=0, atol=0)
    torch.testing.assert_close(branch_dropout.add_dropped(base, branch, 0.0), base + branch, rtol=0, atol=0)
    assert not branch_dropout.fused_runs_on(base, branch) or os.environ.get("TRITON_INTERPRET") == "1"


def test_unfused_form_keeps_the_base_dtype():
    base, branch = torch.randn(4, 8, dtype=torch.float16), torch.randn(4, 8)
    assert branch_dropout.add_dropped(base, branch, 0.5).dtype == torch.float16


_INTERPRETED_CHECK = """
import json, torch
from torch.utils.checkpoint import checkpoint
from i2vedit_core import branch_dropout as bd
g = torch.Generator().manual_seed(0)
n = 3 * 4 * bd.QUARTER + 77  # a partial last program
res = {}
for dtype in (torch.float32, torch.float16):
    base = torch.zeros(n, dtype=dtype, requires_grad=True)  # zero: kept elements are the nonzero outputs
    branch = torch.randn(n, generator=g).to(dtype).requires_grad_()
    assert bd.fused_runs_on(base, branch)
    seed = bd.DropoutSeed()
    out = bd.add_dropped(base, branch, 0.1, seed, 3)
    kept = out.detach() != 0
    grad = torch.randn(n, generator=g).to(dtype)
    out.backward(grad)
    again = bd.add_dropped(base.detach(), branch.detach(), 0.1, seed, 3)
    other_site = bd.add_dropped(base.detach(), branch.detach(), 0.1, seed, 4)
    other_call = bd.add_dropped(base.detach(), branch.detach(), 0.1, bd.DropoutSeed(), 3)
    seed.on(base.device).add_(1)  # what a graph replay does: the same tensor, a new value
    rewritten = bd.add_dropped(base.detach(), branch.detach(), 0.1, seed, 3)
    res[str(dtype)] = dict(
        kept=float(kept.float().mean()), dtype=str(out.dtype), grad_dtype=str(branch.grad.dtype),
        forward=float((out.detach().float() - torch.where(kept, branch.detach().float() / 0.9, 0.0)).abs().max()),
        grad_base=float((base.grad.float() - grad.float()).abs().max()),
        grad_branch=float((branch.grad.float() - torch.where(kept, grad.float() / 0.9, 0.0)).abs().max()),
        same_seed_same_mask=bool(torch.equal(again, out.detach())), sites_differ=not torch.equal(other_site, again),
        calls_differ=not torch.equal(other_call, again), rewritten_seed_differs=not torch.equal(rewritten, again))
q = kept[: 4 * bd.QUARTER].view(4, bd.QUARTER)
res["quarters_differ"] = all(not torch.equal(q[i], q[j]) for i in range(4) for j in range(i + 1, 4))
x = torch.randn(5000, generator=g, requires_grad=True)
call_seed = bd.DropoutSeed()  # one UNet call's: its recomputation reuses it
loss = lambda x: bd.add_dropped(x * 2, x * 3, 0.3, call_seed).pow(2).sum()
loss(x).backward()
plain, x.grad = x.grad.clone(), None
checkpoint(loss, x, use_reentrant=True, preserve_rng_state=False).backward()  # no RNG state to restore
res["checkpoint_grad_diff"] = float((x.grad - plain).abs().max())
kept_grad, dropped_grad = 2 * (2 + 3 / 0.7) ** 2 * x.detach(), 2 * 2 ** 2 * x.detach()  # d/dx of (2x + m 3x/0.7)^2
is_kept = (plain - kept_grad).abs() < 1e-4 * kept_grad.abs().clamp_min(1)
is_dropped = (plain - dropped_grad).abs() < 1e-4 * dropped_grad.abs().clamp_min(1)
res["grad_kept_or_dropped"] = [float(is_kept.float().mean()), float(is_dropped.float().mean()),
                               bool((is_kept | is_dropped).all())]
print(json.dumps(res))
"""


def test_fused_kernel_under_interpreter():
    """The CUDA kernel's numerics on the CPU: triton is imported with TRITON_INTERPRET=1 set, hence a
    fresh interpreter process (as the row-distance kernel's test)."""
    pytest.importorskip("triton")
    res = run_interpreted(_INTERPRETED_CHECK, timeout=300)
    for dtype, tol in (("torch.float32", 1e-6), ("torch.float16", 2e-3)):
        r = res[dtype]
        assert abs(r["kept"] - 0.9) < 0.02, r  # 12365 elements: 7 standard deviations
        assert r["dtype"] == r["grad_dtype"] == dtype
        assert r["forward"] < tol and r["grad_branch"] < tol and r["grad_base"] == 0.0, r
        assert r["same_seed_same_mask"] and r["sites_differ"] and r["calls_differ"], r
        assert r["rewritten_seed_differs"], r
    assert res["quarters_differ"]
    assert res["checkpoint_grad_diff"] == 0.0  # the recomputation redrew the forward's mask
    kept, dropped, every_element = res["grad_kept_or_dropped"]
    assert every_element and abs(kept - 0.7) < 0.05 and abs(dropped - 0.3) < 0.05  # p = 0.3: a mask acted


_INTERPRETED_COMFY_RECOMPUTE = """
import json, torch
from i2vedit_core import branch_dropout as bd
from i2vedit_core.backends import comfy_lora, comfy_training
from i2vedit_core.lora import LoraSpec
torch.manual_seed(0)
block = torch.nn.Sequential(torch.nn.Linear(16, 16, bias=False), torch.nn.Tanh(), torch.nn.Linear(16, 16))
paths = ["input_blocks.1.1.time_stack.0.attn1.to_q", "input_blocks.1.1.time_stack.0.attn1.to_k"]
state = comfy_lora.LoraState()
comfy_lora.attach(state, dict(zip(paths, (block[0], block[2]))), LoraSpec(rank=4, dropout=0.3, attn1_only=True),
                  torch.device("cpu"), torch.Generator().manual_seed(1))
with torch.no_grad():
    for up in state.up.values():
        up.normal_()
for site, (path, linear) in enumerate(zip(paths, (block[0], block[2]))):
    linear.forward = comfy_lora.LoraForward(linear, path, state, site)
state.dropout_active = True
switch = comfy_training.Switch(state)
layer = comfy_training.CheckpointedForward(block, (0, "transformer"), switch)
x = torch.randn(64, 8, 16, generator=torch.Generator().manual_seed(2))
assert bd.fused_runs_on(x, x)

def grads(layers):
    switch.layers = layers
    for p in state.parameters():
        p.grad = None
    torch.manual_seed(3)  # the call's dropout seed is drawn from the device RNG (here the CPU's)
    with comfy_lora.lora_call((1.0, "clip")):
        out = layer(x)
    out.pow(2).sum().backward()  # after the call, as training's backward: the recomputation pins the call
    return torch.cat([p.grad.flatten() for p in state.parameters()])

plain, checkpointed = grads(frozenset()), grads(frozenset({(0, "transformer")}))
torch.manual_seed(4)
with comfy_lora.lora_call((1.0, "clip")):
    other_call = block(x)
torch.manual_seed(3)
with comfy_lora.lora_call((1.0, "clip")):
    same_call = block(x)
print(json.dumps(dict(diff=float((plain - checkpointed).abs().max() / plain.abs().max()),
                      calls_differ=not torch.equal(other_call, same_call))))
"""


def test_a_checkpointed_comfy_layer_redraws_its_calls_masks_under_interpreter():
    """The ComfyUI LoRA's fused dropout inside a checkpointed layer: the recomputation in backward, after the UNet
    call has ended, draws the call's masks again (its LoraCall, with the call's dropout seed, pinned again), so
    the gradients equal those without checkpointing. A recomputation with a fresh seed changes them."""
    pytest.importorskip("triton")
    res = run_interpreted(_INTERPRETED_COMFY_RECOMPUTE, timeout=300)
    assert res["diff"] < 1e-6, res
    assert res["calls_differ"], res  # another call's seed: other masks (the dropout acted)
