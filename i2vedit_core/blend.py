"""SVD's time mixer (`a_s * x_spatial + a_t * x_temporal`) as one Triton kernel forward and one backward, with
PyTorch's roundings: bit for bit the host's.

Every VideoResBlock and spatio-temporal transformer of SVD blends its spatial and temporal branches with a learned
alpha (AlphaBlender). The two branches lie in different memory orders (a ResBlock's spatial branch is a
`(b t) c h w` tensor viewed as `b c t h w`, its temporal branch a `b c t h w` conv output), so PyTorch runs two
products and a sum as three strided passes, and in backward two more products. Here forward reads each branch
once and writes the blend (in the spatial branch's memory order, as PyTorch's does); backward reads the gradient
once and writes both branches'. Each product is rounded to the branches' dtype and then the sum, as PyTorch does:
the numbers are the same, bit for bit. Elsewhere (a trained alpha, more than four dimensions that do not merge,
CPU tensors without the interpreter, no Triton, inside torch.compile) it is PyTorch's ops.
"""

import contextlib
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # optional at run time: PyTorch's ops
    triton = None

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
ROWS, COLUMNS = 4, 256


def blend(a_spatial: torch.Tensor, x_spatial: torch.Tensor, a_temporal: torch.Tensor,
          x_temporal: torch.Tensor) -> torch.Tensor:
    """a_spatial * x_spatial + a_temporal * x_temporal (the alphas broadcast to the branches' shape)."""
    if not runs_fused(a_spatial, x_spatial, a_temporal, x_temporal):
        return a_spatial * x_spatial + a_temporal * x_temporal
    return _Blend.apply(a_spatial, x_spatial, a_temporal, x_temporal)


def runs_fused(a_spatial, x_spatial, a_temporal, x_temporal) -> bool:
    if triton is None or torch.compiler.is_compiling() or not (x_spatial.is_cuda or INTERPRETED):
        return False
    if a_spatial.requires_grad or a_temporal.requires_grad:  # a trained alpha: PyTorch's backward
        return False
    if not (x_spatial.shape == x_temporal.shape and x_spatial.dtype == x_temporal.dtype == a_spatial.dtype
            == a_temporal.dtype and x_spatial.is_floating_point() and x_spatial.numel() > 0):
        return False
    shape = x_spatial.shape
    try:
        tensors = [t.expand(shape) for t in (a_spatial, a_temporal)] + [x_spatial, x_temporal]
    except RuntimeError:
        return False
    out = torch.empty_like(x_spatial, device="meta")  # the output's strides, as forward allocates it
    return merged(shape, [t.stride() for t in tensors + [out]]) is not None


class _Blend(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a_spatial, x_spatial, a_temporal, x_temporal):
        out = torch.empty_like(x_spatial)  # dense branches keep their strides: the spatial branch's order
        shape = x_spatial.shape
        alphas = [a.expand(shape) for a in (a_spatial, a_temporal)]
        _launch(_forward_kernel, shape, [alphas[0], x_spatial, alphas[1], x_temporal, out])
        ctx.save_for_backward(alphas[0], alphas[1])
        ctx.needs = ctx.needs_input_grad[1], ctx.needs_input_grad[3]
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        a_spatial, a_temporal = ctx.saved_tensors
        if merged(grad.shape, [grad.stride(), a_spatial.stride(), a_temporal.stride()]) is None:
            grad = grad.contiguous()
        d_spatial, d_temporal = torch.empty_like(grad), torch.empty_like(grad)
        _launch(_backward_kernel, grad.shape, [a_spatial, a_temporal, grad, d_spatial, d_temporal])
        return None, d_spatial if ctx.needs[0] else None, None, d_temporal if ctx.needs[1] else None


def merged(shape, strides):
    """(sizes, [strides of each tensor]) of `shape` with adjacent dimensions merged where every tensor allows it,
    padded to four with leading 1s; None if more than four remain or a last dimension is not contiguous where it
    has more than one element."""
    sizes, per_tensor = [], [[] for _ in strides]
    for dim, size in enumerate(shape):
        if size == 1:
            continue
        if sizes and all(s[-1] == st[dim] * size for s, st in zip(per_tensor, strides)):
            sizes[-1] *= size
            for s, st in zip(per_tensor, strides):
                s[-1] = st[dim]
            continue
        sizes.append(size)
        for s, st in zip(per_tensor, strides):
            s.append(st[dim])
    if not sizes:
        sizes, per_tensor = [1], [[1] for _ in strides]
    if len(sizes) > 4 or any(s[-1] not in (0, 1) for s in per_tensor):
        return None
    pad = 4 - len(sizes)
    return [1] * pad + sizes, [[0] * pad + s for s in per_tensor]


def _launch(kernel, shape, tensors):
    sizes, strides = merged(shape, [t.stride() for t in tensors])
    rows = sizes[0] * sizes[1] * sizes[2]
    grid = (triton.cdiv(rows, ROWS), triton.cdiv(sizes[3], COLUMNS))
    flat = [value for s in strides for value in s[:3]]
    with (torch.cuda.device(tensors[0].device) if tensors[0].is_cuda else contextlib.nullcontext()):
        kernel[grid](*tensors, rows, sizes[1], sizes[2], sizes[3], *flat,
                     *[s[3] for s in strides], ROWS=ROWS, COLUMNS=COLUMNS)


if triton is not None:
    @triton.jit
    def _offsets(row, column, size1, size2, s0, s1, s2, s3):
        """Element offsets of a (rows, columns) tile in one tensor of strides (s0, s1, s2, s3)."""
        i2 = row % size2
        i1 = (row // size2) % size1
        i0 = row // (size2 * size1)
        return (i0.to(tl.int64) * s0 + i1.to(tl.int64) * s1 + i2.to(tl.int64) * s2)[:, None] \
            + column.to(tl.int64)[None, :] * s3

    @triton.jit
    def _forward_kernel(as_ptr, xs_ptr, at_ptr, xt_ptr, out_ptr, rows, size1, size2, size3,
                        as0, as1, as2, xs0, xs1, xs2, at0, at1, at2, xt0, xt1, xt2, o0, o1, o2,
                        as3, xs3, at3, xt3, o3, ROWS: tl.constexpr, COLUMNS: tl.constexpr):
        row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        column = tl.program_id(1) * COLUMNS + tl.arange(0, COLUMNS)
        inside = (row[:, None] < rows) & (column[None, :] < size3)
        a_s = tl.load(as_ptr + _offsets(row, column, size1, size2, as0, as1, as2, as3), mask=inside, other=0.0)
        x_s = tl.load(xs_ptr + _offsets(row, column, size1, size2, xs0, xs1, xs2, xs3), mask=inside, other=0.0)
        a_t = tl.load(at_ptr + _offsets(row, column, size1, size2, at0, at1, at2, at3), mask=inside, other=0.0)
        x_t = tl.load(xt_ptr + _offsets(row, column, size1, size2, xt0, xt1, xt2, xt3), mask=inside, other=0.0)
        dtype = out_ptr.dtype.element_ty
        spatial = (a_s.to(tl.float32) * x_s.to(tl.float32)).to(dtype)  # each product rounded, as PyTorch's
        temporal = (a_t.to(tl.float32) * x_t.to(tl.float32)).to(dtype)
        out = (spatial.to(tl.float32) + temporal.to(tl.float32)).to(dtype)
        tl.store(out_ptr + _offsets(row, column, size1, size2, o0, o1, o2, o3), out, mask=inside)

    @triton.jit
    def _backward_kernel(as_ptr, at_ptr, g_ptr, ds_ptr, dt_ptr, rows, size1, size2, size3,
                         as0, as1, as2, at0, at1, at2, g0, g1, g2, ds0, ds1, ds2, dt0, dt1, dt2,
                         as3, at3, g3, ds3, dt3, ROWS: tl.constexpr, COLUMNS: tl.constexpr):
        row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        column = tl.program_id(1) * COLUMNS + tl.arange(0, COLUMNS)
        inside = (row[:, None] < rows) & (column[None, :] < size3)
        a_s = tl.load(as_ptr + _offsets(row, column, size1, size2, as0, as1, as2, as3), mask=inside, other=0.0)
        a_t = tl.load(at_ptr + _offsets(row, column, size1, size2, at0, at1, at2, at3), mask=inside, other=0.0)
        g = tl.load(g_ptr + _offsets(row, column, size1, size2, g0, g1, g2, g3), mask=inside, other=0.0)
        dtype = ds_ptr.dtype.element_ty
        tl.store(ds_ptr + _offsets(row, column, size1, size2, ds0, ds1, ds2, ds3),
                 (g.to(tl.float32) * a_s.to(tl.float32)).to(dtype), mask=inside)
        tl.store(dt_ptr + _offsets(row, column, size1, size2, dt0, dt1, dt2, dt3),
                 (g.to(tl.float32) * a_t.to(tl.float32)).to(dtype), mask=inside)
