"""The training step's LayerNorm (i2vedit_core/layer_norm.py) and GEGLU (geglu.py) kernels against float64 references:
under Triton's CPU interpreter here, on the GPU machine for real (CUDA tests are skipped without it)."""

import pytest
import torch
import torch.nn.functional as F

from i2vedit_core import geglu, layer_norm
from interpreted import run_interpreted

_INTERPRETED_CHECK = r'''
import json, torch, torch.nn.functional as F
from i2vedit_core import geglu, layer_norm as ln
res, gen = {}, torch.Generator().manual_seed(0)
# 37 rows (not a multiple of a program's rows) of 320 channels (not a power of two); ComfyUI's fp16 weights
for name, shape in (("rows", (37, 320)), ("tokens", (2, 9, 40))):
    x = (torch.randn(shape, generator=gen) * 2 + 3).to(torch.bfloat16).requires_grad_()
    w, b = (torch.randn(shape[-1], generator=gen).half() for _ in range(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = ln.layer_norm(x, shape[-1:], w, b, 1e-5)
    # a gradient with a mean and a part along x: the row means in backward are then of the order of g itself
    g = (1 + 0.25 * (x.detach().float() - 3) + 0.1 * torch.randn(shape, generator=gen)).to(torch.bfloat16)
    (gx,) = torch.autograd.grad(ours, x, g)
    xr = x.detach().double().requires_grad_()
    ref = F.layer_norm(xr, shape[-1:], w.double(), b.double(), 1e-5)
    (gr,) = torch.autograd.grad(ref, xr, g.double())
    res["ln_" + name] = ["_LayerNorm" in type(ours.grad_fn).__name__, str(ours.dtype), str(gx.dtype),
                         float(((ours.detach().double() - ref.detach()).abs() / (ref.detach().abs() + 1e-2)).max()),
                         float((gx.double() - gr).abs().max() / gr.abs().max())]
x = torch.randn(5, 16, generator=gen).to(torch.bfloat16)
w = torch.randn(16, generator=gen, requires_grad=True)
with torch.autocast("cpu", dtype=torch.bfloat16):
    trained = ln.layer_norm(x, (16,), w, None, 1e-5)  # a weight that trains: PyTorch's own
res["ln_trained_weight"] = [type(trained.grad_fn).__name__, str(trained.dtype)]
with torch.autocast("cpu", dtype=torch.bfloat16):  # a normalized shape or weight not the last dimension's: PyTorch's
    res["ln_wrong_shape"] = [ln.runs_fused(x, (8,), torch.ones(8).half(), None),
                             ln.runs_fused(x, (16,), torch.ones(8).half(), None), ln.runs_fused(x, (16,), None, None)]
x = torch.randn(5, 16, generator=gen)
res["ln_no_autocast"] = bool(torch.equal(ln.layer_norm(x, (16,), w.detach(), None, 1e-5),
                                         F.layer_norm(x, (16,), w.detach(), None, 1e-5)))
for dtype in (torch.float32, torch.bfloat16):
    p = (torch.randn(3, 7, 2 * 300, generator=gen) * 2).to(dtype).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a training step's
        ours = geglu.geglu(p)
    g = torch.randn(ours.shape, generator=gen).to(dtype)
    (gp,) = torch.autograd.grad(ours, p, g)
    pr = p.detach().double().requires_grad_()
    a, gate = pr.chunk(2, dim=-1)
    ref = a * F.gelu(gate)
    (gr,) = torch.autograd.grad(ref, pr, g.double())
    res["geglu_" + str(dtype)] = ["_Geglu" in type(ours.grad_fn).__name__, str(ours.dtype), str(gp.dtype),
                                  float((ours.detach().double() - ref.detach()).abs().max() / ref.abs().max()),
                                  float((gp.double() - gr).abs().max() / gr.abs().max()),
                                  float((gp.double() - gr)[..., 300:].abs().max() / gr[..., 300:].abs().max())]
p = torch.randn(3, 8, generator=gen, requires_grad=True)
res["geglu_no_autocast"] = bool(torch.equal(geglu.geglu(p), p[:, :4] * F.gelu(p[:, 4:])))
print(json.dumps(res))
'''


def test_layer_norm_and_geglu_equal_float64_under_the_interpreter():
    res = run_interpreted(_INTERPRETED_CHECK, timeout=600)
    for name in ("ln_rows", "ln_tokens"):
        fused, dtype, grad_dtype, rel, grad_diff = res[name]
        # the activations' dtype under autocast (norm_precision); within one bf16 ulp (relative 2**-7) of the exact
        # output: Triton's interpreter converts to bf16 by truncation (a GPU rounds, half an ulp)
        assert fused and dtype == grad_dtype == "torch.bfloat16" and rel < 2 ** -7 + 1e-3 and grad_diff < 1e-2, \
            (name, res[name])
    assert res["ln_trained_weight"] == ["NativeLayerNormBackward0", "torch.bfloat16"]  # CPU autocast keeps bf16
    assert res["ln_no_autocast"]
    assert res["ln_wrong_shape"] == [False, False, True]
    fused, dtype, grad_dtype, rel, grad_diff, gate_diff = res["geglu_torch.float32"]
    assert fused and dtype == grad_dtype == "torch.float32" and rel < 1e-6 and grad_diff < 1e-6 and gate_diff < 1e-6
    fused, dtype, grad_dtype, rel, grad_diff, gate_diff = res["geglu_torch.bfloat16"]
    assert fused and dtype == grad_dtype == "torch.bfloat16" and rel < 2 ** -7 and grad_diff < 2 ** -6 \
        and gate_diff < 2 ** -6
    assert res["geglu_no_autocast"]  # an edit's forwards (no autocast): PyTorch's ops, bit for bit


def test_off_the_gpu_they_are_pytorchs_own():
    x = torch.randn(4, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not layer_norm.runs_fused(x.bfloat16(), (8,), None, None)
    assert not geglu.runs_fused(x)
    assert torch.equal(geglu.geglu(x), x[:, :4] * F.gelu(x[:, 4:]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernels run on CUDA")
def test_svd_sized_training_layers_on_the_gpu():
    gen = torch.Generator("cuda").manual_seed(0)
    x = (torch.randn(14 * 64 * 112, 320, generator=gen, device="cuda") + 1).bfloat16().requires_grad_()
    w, b = (torch.randn(320, generator=gen, device="cuda").half() for _ in range(2))
    g = torch.randn(x.shape, generator=gen, device="cuda").bfloat16()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ours = layer_norm.layer_norm(x, (320,), w, b, 1e-5)
        ref = F.layer_norm(x, (320,), w, b, 1e-5)  # autocast's: float32
    assert ours.dtype == torch.bfloat16 and ref.dtype == torch.float32
    # the same number as autocast's float32 output cast to bf16 by the next Linear, to one rounding
    torch.testing.assert_close(ours, ref.bfloat16(), rtol=2 ** -8, atol=1e-2)
    (ours_g,) = torch.autograd.grad(ours, x, g)
    (ref_g,) = torch.autograd.grad(ref, x, g.float())
    torch.testing.assert_close(ours_g.float(), ref_g.float(), rtol=2e-2, atol=2e-2 * float(ref_g.abs().max()))
    p = torch.randn(14 * 64 * 112, 2 * 1280, generator=gen, device="cuda").bfloat16().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = geglu.geglu(p)
    a, gate = p.chunk(2, dim=-1)
    torch.testing.assert_close(out.float(), (a.float() * F.gelu(gate.float())), rtol=2 ** -7, atol=1e-2)
