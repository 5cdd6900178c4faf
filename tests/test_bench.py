"""CPU fallbacks of the GPU benchmarks (bench/): the eager floor, the step extrapolation, the table,
the memory settings, and the ComfyUI LoRA branch's dtype lever (no ComfyUI needed for that class)."""

import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import e2e  # noqa: E402
import floors  # noqa: E402
from i2vedit_core.backends.comfy_lora import LoraForward, LoraState  # noqa: E402
from i2vedit_core.lora import LoraSpec  # noqa: E402
from i2vedit_core.tiny import tiny_unet, tiny_vae  # noqa: E402


def test_diffusers_floor_times_every_call_and_leaves_the_unet_as_it_was():
    pytest.importorskip("peft")
    torch.manual_seed(0)
    unet, vae = tiny_unet(), tiny_vae()
    x = torch.randn(1, 2, 8, 8, 8)
    ctx, ids = torch.randn(1, 1, unet.config.cross_attention_dim), torch.tensor([[5.0, 127.0, 0.02]])
    with torch.no_grad():
        before = unet(x, torch.tensor(0.25), ctx, ids, return_dict=False)[0]
    weights = {k: v.clone() for k, v in unet.state_dict().items()}
    out = floors.diffusers_floors(unet, vae, frames=2, hw=(64, 64), train_hw=(64, 64), reps=1)
    assert set(out) == {"b1", "b2", "b3", "decode", "train_step"}
    assert all(v > 0 for v in out.values())
    # the peft adapter of the floor is gone again: the same weights, bit for bit, and the same function
    after_weights = unet.state_dict()
    assert set(after_weights) == set(weights) and not hasattr(unet, "peft_config")
    assert all(torch.equal(after_weights[k], v) for k, v in weights.items())
    with torch.no_grad():
        after = unet(x, torch.tensor(0.25), ctx, ids, return_dict=False)[0]
    torch.testing.assert_close(after, before, rtol=1e-3, atol=1e-4)  # CPU kernels may pick other blockings


def test_training_extrapolates_per_step_time_after_the_first_step():
    # clip 0: stamps 1 s apart after a slow first step; clip 1: 2 s apart; 5 steps run, 250 wanted
    marks = [[10.0, 11.0, 12.0, 13.0, 14.0], [30.0, 32.0, 34.0, 36.0, 38.0]]
    assert e2e.extrapolate(50.0, marks, 5, 250) == pytest.approx(50.0 + 245 * 1.0 + 245 * 2.0)
    assert e2e.extrapolate(50.0, marks, 5, None) == 50.0
    assert e2e.extrapolate(50.0, [[1.0]], 1, 250) == 50.0  # one step: nothing to extrapolate from
    # a recompile in step 2 (30 s) is a one-off cost, not a per-step one: the median gap is the step time
    assert e2e.extrapolate(50.0, [[10.0, 40.0, 41.0, 42.0, 43.0]], 5, 250) == pytest.approx(50.0 + 245 * 1.0)


def test_table_totals_and_both_ratios():
    rows = dict(invert=6.0, train=120.0, edit=20.0, decode=2.0)
    mems = dict(invert=7.0, train=60.0, edit=15.0, decode=15.0)
    eager = dict(invert=5.0, train=100.0, edit=15.0, decode=1.0)
    own = dict(invert=6.0, train=120.0, edit=16.0, decode=1.0)
    text = e2e.table("t", rows, mems, eager, own)
    total = [line for line in text.splitlines() if "whole clip" in line][0]
    assert "**148.0**" in total and "**121.0**" in total and "**1.22**" in total
    assert "143.0 | 1.03 | 60.0" in total
    assert "| motion LoRA | 120.0 | 100.0 | 1.20 | 120.0 | 1.00 | 60.0 |" in text


def test_budget_settings_lower_the_memory_setting():
    default, capped = e2e.memory_settings(None), e2e.memory_settings(12)
    assert default.memory.setting == "auto" and capped.memory.setting == 12.0
    assert capped.memory.plan("cuda").tier == "12gb"


def _branch(dtype, hidden=16):
    torch.manual_seed(1)
    linear = torch.nn.Linear(hidden, 12).to(dtype)
    state = LoraState()
    state.spec = LoraSpec(rank=4, dropout=0.0)
    state.down["p"] = torch.nn.Parameter(torch.randn(4, hidden) / 4)
    state.up["p"] = torch.nn.Parameter(torch.randn(12, 4) / 4)
    return LoraForward(linear, "p", state), state


def test_lora_branch_runs_in_the_activation_dtype_from_fp32_master_weights():
    forward, state = _branch(torch.float16)
    x = torch.randn(5, 16).to(torch.float16)
    fast = forward(x)
    state.full_precision = True
    reference = forward(x)
    assert fast.dtype == reference.dtype == torch.float16
    # fp16 branch vs fp32 branch: within fp16 rounding of outputs of order 1
    assert 0 < float((fast.float() - reference.float()).abs().max().detach()) < 4e-3
    state.full_precision = False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = forward(x)
    out.float().pow(2).sum().backward()
    assert state.down["p"].dtype == torch.float32 and state.down["p"].grad.dtype == torch.float32
    assert float(state.down["p"].grad.abs().sum()) > 0 and float(state.up["p"].grad.abs().sum()) > 0


def test_lora_branch_in_float32_is_unchanged_by_the_lever():
    forward, state = _branch(torch.float32)
    x = torch.randn(5, 16)
    fast = forward(x)
    state.full_precision = True
    torch.testing.assert_close(fast, forward(x), rtol=0, atol=0)
