"""SVD's time mixer as one kernel (i2vedit_core/blend.py): bit for bit PyTorch's `a_s * x_s + a_t * x_t` and its
gradients, on the memory orders SVD's branches have. Under Triton's CPU interpreter here (fp32 and fp16: the
interpreter truncates to bf16 where a GPU rounds), on the GPU machine for real."""

import pytest
import torch

from i2vedit_core import blend
from interpreted import run_interpreted

_INTERPRETED_CHECK = r'''
import json, torch
from i2vedit_core import blend
from i2vedit_core.backends.comfy_time_mixer import TimeMixerForward
res, gen = {}, torch.Generator().manual_seed(0)

def branches(layout, dtype, b=1, t=3, c=5, h=4, w=6):
    if layout == "resblock":  # the spatial branch a (b t) c h w tensor seen as b c t h w; the temporal a conv output
        x_s = torch.randn(b * t, c, h, w, generator=gen).to(dtype).view(b, t, c, h, w).permute(0, 2, 1, 3, 4)
        x_t = torch.randn(b, c, t, h, w, generator=gen).to(dtype)
        alpha = torch.rand(b, 1, t, 1, 1, generator=gen)
    else:  # a transformer's: (b t) s c, and (b s) t c rearranged to (b t) s c
        x_s = torch.randn(b * t, h * w, c, generator=gen).to(dtype)
        x_t = torch.randn(b, h * w, t, c, generator=gen).to(dtype).permute(0, 2, 1, 3).reshape(b * t, h * w, c)
        alpha = torch.rand(b * t, 1, 1, generator=gen)
    return alpha, x_s.requires_grad_(), x_t.requires_grad_()

for layout in ("resblock", "transformer"):
    for dtype in (torch.float32, torch.float16):
        for b in (1, 2):
            alpha, x_s, x_t = branches(layout, dtype, b)
            a_s, a_t = alpha.to(dtype), (1.0 - alpha).to(dtype)
            g = torch.randn(x_s.shape, generator=gen).to(dtype)
            ours = blend.blend(a_s, x_s, a_t, x_t)
            ref = a_s * x_s + a_t * x_t
            grads = torch.autograd.grad(ours, (x_s, x_t), g)
            ref_grads = torch.autograd.grad(ref, (x_s, x_t), g)
            res[f"{layout}_{dtype}_{b}"] = ["_Blend" in type(ours.grad_fn).__name__, bool(torch.equal(ours, ref)),
                                            all(bool(torch.equal(a, r)) for a, r in zip(grads, ref_grads)),
                                            ours.stride() == ref.stride()]
alpha, x_s, x_t = branches("resblock", torch.float32)
res["trained_alpha"] = blend.runs_fused(alpha.requires_grad_(), x_s, 1 - alpha, x_t)
x = torch.randn(2, 3, 4, 5, 6, 7, generator=gen)
res["unmerged"] = blend.runs_fused(torch.ones(()), x.permute(5, 3, 1, 0, 2, 4), torch.ones(()), x)

class Blender(torch.nn.Module):  # ComfyUI's AlphaBlender's alpha, "learned_with_images"
    mix_factor = torch.nn.Parameter(torch.tensor([0.3]).half(), requires_grad=False)
    def get_alpha(self, indicator, device):
        alpha = torch.where(indicator.bool(), torch.ones(1, 1), torch.sigmoid(self.mix_factor)[..., None])
        return alpha.reshape(1, 1, -1, 1, 1)
alpha, x_s, x_t = branches("resblock", torch.float16)
indicator = torch.tensor([[0.0, 1.0, 0.0]])
a = Blender().get_alpha(indicator, "cpu")
ref = a.to(torch.float16) * x_s + (1.0 - a).to(torch.float16) * x_t
res["module"] = bool(torch.equal(TimeMixerForward(Blender())(x_s, x_t, indicator), ref))
print(json.dumps(res))
'''


def test_blend_is_pytorchs_bit_for_bit_under_the_interpreter():
    res = run_interpreted(_INTERPRETED_CHECK, timeout=600)
    cases = {k: v for k, v in res.items() if k.startswith(("resblock", "transformer"))}
    assert len(cases) == 8 and all(v == [True, True, True, True] for v in cases.values()), cases
    assert res["trained_alpha"] is False and res["unmerged"] is False
    assert res["module"]


def test_off_the_gpu_it_is_pytorchs_ops():
    x_s, x_t, a = torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.rand(2, 1, 1)
    assert not blend.runs_fused(a, x_s, 1 - a, x_t)
    assert torch.equal(blend.blend(a, x_s, 1 - a, x_t), a * x_s + (1 - a) * x_t)


def test_dimensions_merge_where_every_tensor_allows_it():
    base = torch.empty(2, 3, 5, 4, 6)  # (b t) c h w as b c t h w: b and t do not merge with c; h and w do
    x_s = base.view(2, 3, 5, 4, 6)[:1].expand(1, 3, 5, 4, 6).permute(0, 2, 1, 3, 4)
    sizes, strides = blend.merged(x_s.shape, [x_s.stride(), torch.empty(1, 5, 3, 4, 6).stride()])
    assert sizes == [1, 5, 3, 24] and strides == [[0, 24, 120, 1], [0, 72, 24, 1]]
    assert blend.merged((2, 3), [(1, 2)]) is None  # a last dimension not contiguous


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernels run on CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_svd_sized_blend_on_the_gpu_is_bit_for_bit(dtype):
    gen = torch.Generator("cuda").manual_seed(0)
    x_s = torch.randn(14, 320, 72, 128, generator=gen, device="cuda").to(dtype).view(1, 14, 320, 72, 128)
    x_s = x_s.permute(0, 2, 1, 3, 4).requires_grad_()
    x_t = torch.randn(1, 320, 14, 72, 128, generator=gen, device="cuda").to(dtype).requires_grad_()
    alpha = torch.sigmoid(torch.tensor([0.3], device="cuda").half()).reshape(1, 1, 1, 1, 1).expand(1, 1, 14, 1, 1)
    a_s, a_t = alpha.to(dtype), (1.0 - alpha).to(dtype)
    ours, ref = blend.blend(a_s, x_s, a_t, x_t), a_s * x_s + a_t * x_t
    assert torch.equal(ours, ref)
    g = torch.randn(ours.shape, generator=gen, device="cuda").to(dtype)
    for a, r in zip(torch.autograd.grad(ours, (x_s, x_t), g), torch.autograd.grad(ref, (x_s, x_t), g)):
        assert torch.equal(a, r)
