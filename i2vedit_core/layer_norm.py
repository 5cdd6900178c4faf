"""LayerNorm in the activations' dtype under autocast, on CUDA with Triton (forward and the input's gradient).

Autocast runs LayerNorm in float32; SVD's transformers feed each LayerNorm's output to Linears only (q, k, v;
the feed-forwards), which cast it back to bf16, one copy each, and backward undoes every copy. Here, where
norm_precision.keeps_activation_dtype holds (a training step: autocast on, frozen weight and bias), one kernel
reads the bf16 rows, computes mean, 1/std and the affine output in float32 and writes bf16; backward is one
kernel for dL/dx alone. Everywhere else (no autocast, a weight that trains, CPU tensors without the
interpreter, no Triton, inside torch.compile) it is `F.layer_norm`. Runs on CPU tensors under
TRITON_INTERPRET=1 (how the tests check it).
"""

import torch
import torch.nn.functional as F

from .kernel_support import kernels_run_on, on_device, tl, triton
from .norm_precision import keeps_activation_dtype

TILE = 4096  # elements of one program: several rows of SVD's 320-1280 channels
MAX_WIDTH = 8192


def layer_norm(x: torch.Tensor, shape, weight=None, bias=None, eps: float = 1e-5) -> torch.Tensor:
    """F.layer_norm(x, shape, weight, bias, eps); in x's dtype where norm_precision says so."""
    if not runs_fused(x, shape, weight, bias):
        return F.layer_norm(x, shape, weight, bias, eps)
    return _LayerNorm.apply(x, weight, bias, float(eps))


class LayerNormForward:
    """Replacement `forward` of one torch.nn.LayerNorm module through `layer_norm` (not an nn.Module: no state-dict
    key)."""

    def __init__(self, module: torch.nn.LayerNorm):
        self.module = module

    def __call__(self, input):
        m = self.module
        return layer_norm(input, m.normalized_shape, m.weight, m.bias, m.eps)


def runs_fused(x: torch.Tensor, shape, weight, bias) -> bool:
    if not kernels_run_on(x):
        return False
    width = x.shape[-1] if x.dim() else 0
    return (tuple(shape) == (width,) and 0 < width <= MAX_WIDTH and x.numel() > 0
            and all(p is None or p.shape == (width,) for p in (weight, bias))
            and keeps_activation_dtype(x, weight, bias))


class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        x = x.contiguous()
        width = x.shape[-1]
        rows = x.numel() // width
        out = torch.empty_like(x)
        mean = torch.empty(rows, dtype=torch.float32, device=x.device)
        rstd = torch.empty_like(mean)
        block, per_program = tiling(width)
        with on_device(x):
            _forward_kernel[(triton.cdiv(rows, per_program),)](
                x, weight if weight is not None else x, bias if bias is not None else x, out, mean, rstd, rows,
                width, eps, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, ROWS=per_program, BLOCK=block)
        ctx.save_for_backward(x, weight, mean, rstd)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight, mean, rstd = ctx.saved_tensors
        grad = grad.contiguous()
        width = x.shape[-1]
        rows = x.numel() // width
        dx = torch.empty_like(x)
        block, per_program = tiling(width)
        with on_device(x):
            _backward_kernel[(triton.cdiv(rows, per_program),)](
                x, grad, weight if weight is not None else x, mean, rstd, dx, rows, width,
                HAS_WEIGHT=weight is not None, ROWS=per_program, BLOCK=block)
        return dx, None, None, None


def tiling(width: int):
    """(columns of a tile, a power of two >= width; rows of a program)."""
    block = triton.next_power_of_2(width)
    return block, max(1, TILE // block)



if triton is not None:
    @triton.jit
    def _tile(rows, width, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        """(row indices, column indices, element offsets, in-bounds mask) of this program's tile."""
        row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        column = tl.arange(0, BLOCK)
        inside = (row[:, None] < rows) & (column[None, :] < width)
        return row, column, row.to(tl.int64)[:, None] * width + column[None, :], inside

    @triton.jit
    def _forward_kernel(x_ptr, w_ptr, b_ptr, out_ptr, mean_ptr, rstd_ptr, rows, width, eps,
                        HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        row, column, offsets, inside = _tile(rows, width, ROWS, BLOCK)
        x = tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1) / width
        centred = tl.where(inside, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / width + eps)
        y = centred * rstd[:, None]
        if HAS_WEIGHT:
            y = y * tl.load(w_ptr + column, mask=column < width, other=1.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            y = y + tl.load(b_ptr + column, mask=column < width, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offsets, y.to(out_ptr.dtype.element_ty), mask=inside)
        tl.store(mean_ptr + row, mean, mask=row < rows)
        tl.store(rstd_ptr + row, rstd, mask=row < rows)

    @triton.jit
    def _backward_kernel(x_ptr, dy_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, rows, width, HAS_WEIGHT: tl.constexpr,
                         ROWS: tl.constexpr, BLOCK: tl.constexpr):
        """dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat)) per row, g = weight * dy."""
        row, column, offsets, inside = _tile(rows, width, ROWS, BLOCK)
        mean = tl.load(mean_ptr + row, mask=row < rows, other=0.0)
        rstd = tl.load(rstd_ptr + row, mask=row < rows, other=0.0)
        x_hat = (tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float32) - mean[:, None]) * rstd[:, None]
        g = tl.load(dy_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        if HAS_WEIGHT:
            g = g * tl.load(w_ptr + column, mask=column < width, other=0.0).to(tl.float32)[None, :]
        mean_g = tl.sum(g, axis=1) / width
        mean_gx = tl.sum(g * x_hat, axis=1) / width
        dx = rstd[:, None] * (g - mean_g[:, None] - x_hat * mean_gx[:, None])
        tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=inside)
