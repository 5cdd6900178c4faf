"""The split-statistics GroupNorm (i2vedit_core/group_norm.py) against F.group_norm: its Triton kernels run under
the CPU interpreter here, and on the GPU machine for real (tests that need CUDA are skipped without it)."""

import pytest
import torch
import torch.nn.functional as F

from i2vedit_core import group_norm as gn
from interpreted import run_interpreted

_INTERPRETED_CHECK = r'''
import json, torch, torch.nn.functional as F
from i2vedit_core import group_norm as gn
res, gen = {}, torch.Generator().manual_seed(0)
cases = (("spatial", (3, 16, 5, 7), 4, torch.float32), ("video", (1, 8, 3, 40, 50), 2, torch.float32),
         ("chunks", (1, 4, 2, 100, 100), 2, torch.float32),  # 40000 elements a group: 3 chunks, the last partial
         ("half", (2, 8, 9, 9), 4, torch.float16))
for name, shape, groups, dtype in cases:
    x = (torch.randn(shape, generator=gen) * 0.5 + 40).to(dtype)  # a mean 80 stds away: no cancellation allowed
    w, b = (torch.randn(shape[1], generator=gen).to(dtype) for _ in range(2))
    ours = gn.group_norm(x, groups, w, b, 1e-5)
    ref = F.group_norm(x.double(), groups, w.double(), b.double(), 1e-5)
    res[name] = [gn.runs_fused(x, groups), float((ours.double() - ref).abs().max()), str(ours.dtype)]
x = torch.randn(2, 8, 6, 6, generator=gen).to(torch.bfloat16).requires_grad_()
w = torch.randn(8, generator=gen)
with torch.autocast("cpu", dtype=torch.bfloat16):
    ours = gn.group_norm(x, 4, w, None, 1e-6)
g = torch.randn(ours.shape, generator=gen)
(gx,) = torch.autograd.grad((ours * g).sum(), x)
xr = x.detach().double().requires_grad_()
ref = F.group_norm(xr, 4, w.double(), None, 1e-6)
(gr,) = torch.autograd.grad((ref * g.double()).sum(), xr)
res["autocast"] = [float((ours.detach().double() - ref.detach()).abs().max()), str(ours.dtype),
                   float((gx.double() - gr).abs().max() / gr.abs().max()), str(gx.dtype)]
w.requires_grad_()  # a weight that trains: autocast's float32 output and PyTorch's backward
with torch.autocast("cpu", dtype=torch.bfloat16):
    ours = gn.group_norm(x, 4, w, None, 1e-6)
gx, gw = torch.autograd.grad((ours * g).sum(), (x, w))
res["autocast_trained_weight"] = [float((ours.detach().double() - ref.detach()).abs().max()), str(ours.dtype),
                                  float((gx.double() - gr).abs().max() / gr.abs().max())]
# A training step's GroupNorm: frozen fp16 weights (ComfyUI's), bf16 activations, 14 frames x 32 groups (not split
# outside autocast), then one group of three chunks: the input's gradient by the pack's kernels.
for name, shape, groups in (("frames", (14, 64, 3, 5), 32), ("chunks", (1, 4, 2, 100, 100), 2)):
    x = (torch.randn(shape, generator=gen) * 2 + 3).to(torch.bfloat16).requires_grad_()
    w, b = (torch.randn(shape[1], generator=gen).half() for _ in range(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = gn.group_norm(x, groups, w, b, 1e-5)
    # a gradient with a mean and a part along x: the group means in backward are then of the order of g itself
    g = (1 + 0.25 * (x.detach().float() - 3) + 0.1 * torch.randn(shape, generator=gen)).to(torch.bfloat16)
    (gx,) = torch.autograd.grad(ours, x, g)
    xr = x.detach().double().requires_grad_()
    ref = F.group_norm(xr, groups, w.double(), b.double(), 1e-5)
    (gr,) = torch.autograd.grad(ref, xr, g.double())
    res["frozen_" + name] = ["_GroupNorm" in type(ours.grad_fn).__name__, str(ours.dtype), str(gx.dtype),
                             float(((ours.detach().double() - ref.detach()).abs() / (ref.detach().abs() + 1e-2)).max()),
                             float((gx.double() - gr).abs().max() / gr.abs().max())]
x = torch.randn(2, 8, 5, 5, generator=gen, requires_grad=True)
w, b = (torch.randn(8, generator=gen, requires_grad=True) for _ in range(2))
g = torch.randn(2, 8, 5, 5, generator=gen)
ours = torch.autograd.grad((gn.group_norm(x, 2, w, b, 1e-5) * g).sum(), (x, w, b))
ref = torch.autograd.grad((F.group_norm(x, 2, w, b, 1e-5) * g).sum(), (x, w, b))
res["grads"] = [float((a - r).abs().max()) for a, r in zip(ours, ref)]
res["split_where"] = [gn.runs_fused(torch.empty(1, 64, 3, 2, 2), 32), gn.runs_fused(torch.empty(14, 64, 2, 2), 32),
                      gn.runs_fused(torch.empty(1, 1, gn.MAX_CHUNKS * gn.CHUNK + 1, device="meta"), 1)]
print(json.dumps(res))
'''


def test_split_statistics_equal_group_norm_under_the_interpreter():
    res = run_interpreted(_INTERPRETED_CHECK, timeout=600)
    for name in ("spatial", "video", "chunks"):
        fused, diff, dtype = res[name]
        assert fused and dtype == "torch.float32" and diff < 2e-5, (name, res[name])
    fused, diff, dtype = res["half"]
    assert fused and dtype == "torch.float16" and diff < 4e-3  # fp16 rounding of outputs up to about 4
    diff, dtype, grad_diff, grad_dtype = res["autocast"]
    # frozen weight under autocast: the output in the input's dtype (norm_precision), one bf16 rounding of outputs
    # up to about 4; the input's gradient in its own dtype
    assert dtype == "torch.bfloat16" and diff < 2e-2 and grad_dtype == "torch.bfloat16" and grad_diff < 1e-2
    diff, dtype, grad_diff = res["autocast_trained_weight"]
    # CUDA autocast's GroupNorm where the weight trains: float32 statistics and output
    assert dtype == "torch.float32" and diff < 1e-5 and grad_diff < 1e-2
    for name in ("frozen_frames", "frozen_chunks"):
        fused, dtype, grad_dtype, rel, grad_diff = res[name]
        # within one bf16 ulp (relative 2**-7) of the exact output: Triton's interpreter converts to bf16 by
        # truncation (a GPU rounds, half an ulp); the gradient within bf16 rounding
        assert fused and dtype == grad_dtype == "torch.bfloat16" and rel < 2 ** -7 + 1e-3 and grad_diff < 1e-2, \
            (name, res[name])
    assert max(res["grads"]) < 1e-5
    # a video as one sample (32 rows), not 14 frames (448 rows), nor a group of more chunks than a grid axis holds
    assert res["split_where"] == [True, False, False]


def test_off_the_gpu_it_is_f_group_norm_itself():
    x = torch.randn(2, 8, 4, 4)
    assert not gn.runs_fused(x, 4)
    w, b = torch.randn(8), torch.randn(8)
    assert torch.equal(gn.group_norm(x, 4, w, b, 1e-6), F.group_norm(x, 4, w, b, 1e-6))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernels run on CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_svd_sized_group_norm_on_the_gpu(dtype):
    gen = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(1, 320, 14, 72, 128, generator=gen, device="cuda").to(dtype) * 2 + 1  # a temporal ResBlock's
    w, b = (torch.randn(320, generator=gen, device="cuda").to(dtype) for _ in range(2))
    ours = gn.group_norm(x, 32, w, b, 1e-5)
    ref = F.group_norm(x.float(), 32, w.float(), b.float(), 1e-5)
    assert gn.runs_fused(x, 32) and ours.dtype == dtype
    torch.testing.assert_close(ours.float(), ref, rtol=0, atol=0.05)
