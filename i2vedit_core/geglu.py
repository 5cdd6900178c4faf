"""GEGLU (`a * gelu(gate)` of a projection's two halves) as one Triton kernel forward and one backward, in training.

SVD's feed-forwards split their projection's output into halves and multiply one by the other's erf GELU. PyTorch
runs that as a GELU over a strided half, a product of two strided halves, and in backward two products, a GELU
backward and a concatenation of the halves' gradients, each a pass over memory (`bench/op_sources.py --pack`:
about 40 ms of a 400 ms training step). Here forward reads the projection once and writes the product; backward
reads the projection and the product's gradient and writes both halves' gradients. It keeps only the projection
for backward (PyTorch also keeps the GELU's output).

It computes in float32 and rounds once (PyTorch rounds the GELU's output, then the product). It runs only under
autocast (a training step's mixed precision, in its forward and in a checkpointed layer's no-grad forward and
recomputation alike), so an edit's or an inversion's forwards stay bit for bit the host's. Elsewhere (no autocast,
CPU tensors without the interpreter, no Triton, inside torch.compile) it is PyTorch's.
"""

import torch
import torch.nn.functional as F

from .kernel_support import kernels_run_on, on_device, tl, triton

ROWS, COLUMNS = 4, 256  # a tile of the product; columns contiguous in memory


def geglu(projected: torch.Tensor) -> torch.Tensor:
    """a * gelu(gate) for (a, gate) = projected.chunk(2, dim=-1)."""
    if not runs_fused(projected):
        a, gate = projected.chunk(2, dim=-1)
        return a * F.gelu(gate)
    return _Geglu.apply(projected)


class GegluForward:
    """Replacement `forward` of a GEGLU module (ComfyUI's or diffusers'): its `proj`, then `geglu`."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def __call__(self, x, *args, **kwargs):
        return geglu(self.module.proj(x))


def runs_fused(projected: torch.Tensor) -> bool:
    if not kernels_run_on(projected):
        return False
    return (torch.is_autocast_enabled(projected.device.type) and projected.is_floating_point()
            and projected.dim() >= 1 and projected.shape[-1] % 2 == 0 and projected.numel() > 0)


class _Geglu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, projected):
        projected = projected.contiguous()
        half = projected.shape[-1] // 2
        out = torch.empty(*projected.shape[:-1], half, dtype=projected.dtype, device=projected.device)
        with on_device(projected):
            _forward_kernel[grid(out)](projected, out, out.numel() // half, half, ROWS=ROWS, COLUMNS=COLUMNS)
        ctx.save_for_backward(projected)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (projected,) = ctx.saved_tensors
        grad = grad.contiguous()
        half = projected.shape[-1] // 2
        d_projected = torch.empty_like(projected)
        with on_device(projected):
            _backward_kernel[grid(grad)](projected, grad, d_projected, grad.numel() // half, half, ROWS=ROWS,
                                         COLUMNS=COLUMNS)
        return d_projected


def grid(product: torch.Tensor):
    half = product.shape[-1]
    return triton.cdiv(product.numel() // half, ROWS), triton.cdiv(half, COLUMNS)



if triton is not None:
    @triton.jit
    def _halves(p_ptr, rows, half, ROWS: tl.constexpr, COLUMNS: tl.constexpr):
        """(offsets in the product, offsets of a in the projection, a, gate as float32, mask) of this tile."""
        row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        column = tl.program_id(1) * COLUMNS + tl.arange(0, COLUMNS)
        inside = (row[:, None] < rows) & (column[None, :] < half)
        index = row.to(tl.int64)[:, None] * half + column[None, :]
        a_at = row.to(tl.int64)[:, None] * (2 * half) + column[None, :]
        a = tl.load(p_ptr + a_at, mask=inside, other=0.0).to(tl.float32)
        gate = tl.load(p_ptr + a_at + half, mask=inside, other=0.0).to(tl.float32)
        return index, a_at, a, gate, inside

    @triton.jit
    def _forward_kernel(p_ptr, out_ptr, rows, half, ROWS: tl.constexpr, COLUMNS: tl.constexpr):
        index, _, a, gate, inside = _halves(p_ptr, rows, half, ROWS, COLUMNS)
        gelu = 0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476))
        tl.store(out_ptr + index, (a * gelu).to(out_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _backward_kernel(p_ptr, dy_ptr, dp_ptr, rows, half, ROWS: tl.constexpr, COLUMNS: tl.constexpr):
        index, a_at, a, gate, inside = _halves(p_ptr, rows, half, ROWS, COLUMNS)
        dy = tl.load(dy_ptr + index, mask=inside, other=0.0).to(tl.float32)
        cdf = 0.5 * (1.0 + tl.math.erf(gate * 0.7071067811865476))
        pdf = 0.3989422804014327 * tl.exp(-0.5 * gate * gate)
        tl.store(dp_ptr + a_at, (dy * gate * cdf).to(dp_ptr.dtype.element_ty), mask=inside)
        tl.store(dp_ptr + a_at + half, (dy * a * (cdf + gate * pdf)).to(dp_ptr.dtype.element_ty), mask=inside)
