"""GroupNorm with its statistics reduced by many programs per group, on CUDA with Triton (forward; PyTorch's backward),
where PyTorch's kernel has too few groups to fill the GPU.

PyTorch's CUDA GroupNorm reduces each (sample, group) with one thread block. SVD's temporal ResBlocks normalise a
whole video as one sample (32 groups of 10 channels x 14 frames x 9216 tokens at 576x1024), so 32 blocks stream
about 80 MB while the rest of an H200 idles: GroupNorm took 13 % of a plain UNet forward (`bench/op_sources.py`,
docs/PERFORMANCE.md run 10). Here each group is split into chunks: one program per chunk computes the chunk's
mean and sum of squared deviations, a second kernel merges them per group (Chan's formula: no cancellation
between a large mean and a small variance), and a third normalises, one program per chunk again.

The numbers are those of `F.group_norm` up to float32 summation order. Under autocast with frozen weights (a
training step) the output keeps the input's dtype, every group size takes the split kernels, and backward is two
more kernels for the input's gradient alone (norm_precision.py says why); under autocast otherwise the statistics
and output are float32, as autocast runs GroupNorm. The input is read in its own dtype (no float32 copy). Off the
training step's path, backward is PyTorch's own (`native_group_norm_backward`) from the saved mean and 1/std. Elsewhere (CPU tensors, no Triton, inside torch.compile) it is `F.group_norm`. Runs on CPU tensors under
TRITON_INTERPRET=1 (how the tests check it).
"""

import torch
import torch.nn.functional as F

from .kernel_support import kernels_run_on, on_device, tl, triton
from .norm_precision import keeps_activation_dtype

BLOCK = 1024
CHUNK = 16 * BLOCK  # elements of one group per program
# PyTorch's kernel is as fast where it has enough (sample, group) rows to fill the GPU: 14 frames x 32 groups
# (a spatial ResBlock) ran in 0.231 ms against 0.244 here, and slower here with backward; a video as one sample
# (32 rows) in 1.187 ms against 0.266 (H200, bench/op_sources.py). So only fewer rows than this take the split.
SPLIT_BELOW_ROWS = 256
MAX_CHUNKS = 65535  # the grid's second axis: about 1.07e9 elements per (sample, group)


def group_norm(x: torch.Tensor, groups: int, weight=None, bias=None, eps: float = 1e-5) -> torch.Tensor:
    """F.group_norm(x, groups, weight, bias, eps), its statistics split over many programs where that runs."""
    keep = keeps_activation_dtype(x, weight, bias)
    if not runs_fused(x, groups, any_rows=keep):
        return F.group_norm(x, groups, weight, bias, eps)
    out_dtype = torch.float32 if torch.is_autocast_enabled(x.device.type) and not keep else x.dtype
    return _GroupNorm.apply(x, weight, bias, groups, float(eps), out_dtype, keep)


class GroupNormForward:
    """Replacement `forward` of one torch.nn.GroupNorm module through `group_norm`; not an nn.Module, so setting
    it as the module's `forward` adds no state-dict key."""

    def __init__(self, module: torch.nn.GroupNorm):
        self.module = module

    def __call__(self, input):
        m = self.module
        return group_norm(input, m.num_groups, m.weight, m.bias, m.eps)


def runs_fused(x: torch.Tensor, groups: int, any_rows: bool = False) -> bool:
    """Whether the split kernels run: on CUDA (or interpreted), outside torch.compile, below SPLIT_BELOW_ROWS
    (sample, group) rows unless `any_rows` (PyTorch's float32 output under autocast costs more than its kernel
    saves)."""
    if not kernels_run_on(x):
        return False
    if not (x.dim() >= 2 and x.is_floating_point() and x.shape[1] % groups == 0 and x.numel() > 0):
        return False
    group_size = x.numel() // (x.shape[0] * groups)
    return (any_rows or x.shape[0] * groups < SPLIT_BELOW_ROWS) and -(-group_size // CHUNK) <= MAX_CHUNKS


class _GroupNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, groups, eps, out_dtype, keep):
        x = x.contiguous()
        samples, channels = x.shape[:2]
        spatial = x.numel() // (samples * channels)
        mean, rstd = statistics(x, groups, eps)
        out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
        group_size = channels // groups * spatial
        grid = (samples * groups, triton.cdiv(group_size, CHUNK))
        with on_device(x):
            _normalize_kernel[grid](x, weight if weight is not None else x, bias if bias is not None else x, mean,
                                    rstd, out, group_size, spatial, channels // groups, groups,
                                    HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, CHUNK=CHUNK, BLOCK=BLOCK)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.shape = (samples, channels, spatial, groups)
        ctx.keep = keep  # the training step's path: the input gradient by the pack's kernels
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight, mean, rstd = ctx.saved_tensors
        samples, channels, spatial, groups = ctx.shape
        if ctx.keep:  # frozen weight and bias: no gradient of theirs to compute
            return input_gradient(grad, x, weight, mean, rstd, ctx.shape), None, None, None, None, None, None
        dtype = grad.dtype  # PyTorch's backward takes one dtype: autocast's float32 output, or x's own
        mask = [ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
        dx, dw, db = torch.ops.aten.native_group_norm_backward(
            grad.contiguous(), x.to(dtype), mean.to(dtype), rstd.to(dtype),
            weight.to(dtype) if weight is not None else None, samples, channels, spatial, groups, mask)
        param_dtype = weight.dtype if weight is not None else x.dtype
        return (dx.to(x.dtype) if dx is not None else None, dw.to(param_dtype) if dw is not None else None,
                db.to(param_dtype) if db is not None else None, None, None, None, None)


def input_gradient(grad, x, weight, mean, rstd, shape):
    """dL/dx alone (frozen weight and bias), in x's dtype: rstd * (g - mean(g) - x_hat * mean(g * x_hat)) per group,
    g = weight * grad; the two group means reduced by many programs per group, as the statistics are."""
    samples, channels, spatial, groups = shape
    grad = grad.contiguous()
    group_size = channels // groups * spatial
    chunks = triton.cdiv(group_size, CHUNK)
    partial = torch.empty(samples * groups, chunks, 2, dtype=torch.float32, device=x.device)
    dx = torch.empty_like(x)
    args = (x, grad, weight if weight is not None else x, mean, rstd)
    sizes = (group_size, spatial, channels // groups, groups, chunks)
    with on_device(x):
        _grad_partial_kernel[(samples * groups, chunks)](*args, partial, *sizes, HAS_WEIGHT=weight is not None,
                                                         CHUNK=CHUNK, BLOCK=BLOCK)
        _grad_input_kernel[(samples * groups, chunks)](*args, partial, dx, *sizes, HAS_WEIGHT=weight is not None,
                                                       CHUNK=CHUNK, BLOCK=BLOCK,
                                                       CHUNKS=triton.next_power_of_2(chunks))
    return dx


def statistics(x: torch.Tensor, groups: int, eps: float):
    """(mean, 1/std) float32 (samples, groups) of contiguous x (samples, channels, ...)."""
    samples, channels = x.shape[:2]
    group_size = channels // groups * (x.numel() // (samples * channels))
    chunks = triton.cdiv(group_size, CHUNK)
    partial = torch.empty(samples * groups, chunks, 2, dtype=torch.float32, device=x.device)
    mean = torch.empty(samples, groups, dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    with on_device(x):
        _partial_kernel[(samples * groups, chunks)](x, partial, group_size, chunks, CHUNK=CHUNK, BLOCK=BLOCK)
        _merge_kernel[(samples * groups,)](partial, mean, rstd, group_size, chunks, eps, CHUNK=CHUNK,
                                           CHUNKS=triton.next_power_of_2(chunks))
    return mean, rstd



if triton is not None:
    @triton.jit
    def _partial_kernel(x_ptr, partial_ptr, group_size, chunks, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
        """One chunk of one group: its mean and its sum of squared deviations (Chan's merge over BLOCK tiles)."""
        row, chunk = tl.program_id(0), tl.program_id(1)
        start = chunk * CHUNK
        base = x_ptr + row.to(tl.int64) * group_size
        count = 0.0
        mean = 0.0
        m2 = 0.0
        for tile in range(0, tl.minimum(CHUNK, group_size - start), BLOCK):  # the last chunk may be short
            offsets = start + tile + tl.arange(0, BLOCK)
            inside = offsets < group_size
            values = tl.load(base + offsets, mask=inside, other=0.0).to(tl.float32)
            n = tl.sum(inside.to(tl.float32), axis=0)
            tile_mean = tl.sum(values, axis=0) / tl.maximum(n, 1.0)
            tile_m2 = tl.sum(tl.where(inside, (values - tile_mean) * (values - tile_mean), 0.0), axis=0)
            total = count + n
            delta = tile_mean - mean
            mean = mean + delta * n / tl.maximum(total, 1.0)
            m2 = m2 + tile_m2 + delta * delta * count * n / tl.maximum(total, 1.0)
            count = total
        out = partial_ptr + (row.to(tl.int64) * chunks + chunk) * 2
        tl.store(out, mean)
        tl.store(out + 1, m2)

    @triton.jit
    def _merge_kernel(partial_ptr, mean_ptr, rstd_ptr, group_size, chunks, eps, CHUNK: tl.constexpr,
                      CHUNKS: tl.constexpr):
        """One group: its chunks' (mean, M2) merged; every chunk holds CHUNK elements but the last."""
        row = tl.program_id(0)
        index = tl.arange(0, CHUNKS)
        inside = index < chunks
        base = partial_ptr + row.to(tl.int64) * chunks * 2
        means = tl.load(base + index * 2, mask=inside, other=0.0)
        m2s = tl.load(base + index * 2 + 1, mask=inside, other=0.0)
        counts = tl.where(inside, tl.minimum(group_size - index * CHUNK, CHUNK).to(tl.float32), 0.0)
        mean = tl.sum(means * counts, axis=0) / group_size
        m2 = tl.sum(m2s + counts * (means - mean) * (means - mean), axis=0)
        tl.store(mean_ptr + row, mean)
        tl.store(rstd_ptr + row, 1.0 / tl.sqrt(m2 / group_size + eps))

    @triton.jit
    def _normalize_kernel(x_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, out_ptr, group_size, spatial, per_group, groups,
                          HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
        row, chunk = tl.program_id(0), tl.program_id(1)
        mean = tl.load(mean_ptr + row)
        rstd = tl.load(rstd_ptr + row)
        first_channel = (row % groups) * per_group
        base = row.to(tl.int64) * group_size
        for tile in range(0, tl.minimum(CHUNK, group_size - chunk * CHUNK), BLOCK):
            offsets = chunk * CHUNK + tile + tl.arange(0, BLOCK)
            inside = offsets < group_size
            y = (tl.load(x_ptr + base + offsets, mask=inside, other=0.0).to(tl.float32) - mean) * rstd
            channel = first_channel + offsets // spatial
            if HAS_WEIGHT:
                y = y * tl.load(w_ptr + channel, mask=inside, other=1.0).to(tl.float32)
            if HAS_BIAS:
                y = y + tl.load(b_ptr + channel, mask=inside, other=0.0).to(tl.float32)
            tl.store(out_ptr + base + offsets, y.to(out_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _scaled_grad(x_ptr, dy_ptr, w_ptr, base, offsets, inside, first_channel, spatial, mean, rstd,
                     HAS_WEIGHT: tl.constexpr):
        """(weight * dy, x_hat) of one tile, zero outside the group."""
        x_hat = (tl.load(x_ptr + base + offsets, mask=inside, other=0.0).to(tl.float32) - mean) * rstd
        g = tl.load(dy_ptr + base + offsets, mask=inside, other=0.0).to(tl.float32)
        if HAS_WEIGHT:
            g = g * tl.load(w_ptr + first_channel + offsets // spatial, mask=inside, other=0.0).to(tl.float32)
        return g, x_hat

    @triton.jit
    def _grad_partial_kernel(x_ptr, dy_ptr, w_ptr, mean_ptr, rstd_ptr, partial_ptr, group_size, spatial, per_group,
                             groups, chunks, HAS_WEIGHT: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
        """One chunk of one group: the sums of g and of g * x_hat."""
        row, chunk = tl.program_id(0), tl.program_id(1)
        mean = tl.load(mean_ptr + row)
        rstd = tl.load(rstd_ptr + row)
        first_channel = (row % groups) * per_group
        base = row.to(tl.int64) * group_size
        sum_g = tl.zeros([BLOCK], dtype=tl.float32)
        sum_gx = tl.zeros([BLOCK], dtype=tl.float32)
        for tile in range(0, tl.minimum(CHUNK, group_size - chunk * CHUNK), BLOCK):
            offsets = chunk * CHUNK + tile + tl.arange(0, BLOCK)
            g, x_hat = _scaled_grad(x_ptr, dy_ptr, w_ptr, base, offsets, offsets < group_size, first_channel,
                                    spatial, mean, rstd, HAS_WEIGHT)
            sum_g += g
            sum_gx += g * x_hat
        out = partial_ptr + (row.to(tl.int64) * chunks + chunk) * 2
        tl.store(out, tl.sum(sum_g, axis=0))
        tl.store(out + 1, tl.sum(sum_gx, axis=0))

    @triton.jit
    def _grad_input_kernel(x_ptr, dy_ptr, w_ptr, mean_ptr, rstd_ptr, partial_ptr, dx_ptr, group_size, spatial,
                           per_group, groups, chunks, HAS_WEIGHT: tl.constexpr, CHUNK: tl.constexpr,
                           BLOCK: tl.constexpr, CHUNKS: tl.constexpr):
        row, chunk = tl.program_id(0), tl.program_id(1)
        mean = tl.load(mean_ptr + row)
        rstd = tl.load(rstd_ptr + row)
        index = tl.arange(0, CHUNKS)
        sums = partial_ptr + row.to(tl.int64) * chunks * 2 + index * 2
        mean_g = tl.sum(tl.load(sums, mask=index < chunks, other=0.0), axis=0) / group_size
        mean_gx = tl.sum(tl.load(sums + 1, mask=index < chunks, other=0.0), axis=0) / group_size
        first_channel = (row % groups) * per_group
        base = row.to(tl.int64) * group_size
        for tile in range(0, tl.minimum(CHUNK, group_size - chunk * CHUNK), BLOCK):
            offsets = chunk * CHUNK + tile + tl.arange(0, BLOCK)
            inside = offsets < group_size
            g, x_hat = _scaled_grad(x_ptr, dy_ptr, w_ptr, base, offsets, inside, first_channel, spatial, mean,
                                    rstd, HAS_WEIGHT)
            dx = rstd * (g - mean_g - x_hat * mean_gx)
            tl.store(dx_ptr + base + offsets, dx.to(dx_ptr.dtype.element_ty), mask=inside)
