"""base + dropout(branch): the motion LoRA's output with dropout on its branch (ALGORITHM 4), fused on CUDA.

Eagerly, dropout on the branch output draws a mask, scales and adds in three passes over a tensor as large
as the Linear's output, keeps a byte-per-element mask for backward and multiplies by it there: on SVD's
192 temporal Linears at 512x896 that is about 6.8 G elements per training step. On CUDA with Triton one
kernel adds the dropped branch and keeps only a seed; backward draws the same mask again from it.

The distribution is dropout's (each element kept with probability 1 - p, kept values scaled by 1 / (1 - p));
the random stream is Triton's Philox, not F.dropout's. The seed of each call comes from the global CPU RNG,
which training seeds and torch.utils.checkpoint restores before a recomputation, so a checkpointed layer
redraws the same mask. Where the kernel does not run (CPU tensors, no Triton, inside torch.compile, where
inductor fuses F.dropout itself) it is base + F.dropout(branch). Runs on CPU tensors under
TRITON_INTERPRET=1 (how the tests check it). docs/PERFORMANCE.md has the measured effect.
"""

import contextlib
import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # optional at run time: the unfused form below
    triton = None

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # read once, as Triton does at import
QUARTER = 1024  # a program covers 4 x QUARTER elements: one Philox draw gives 4 random numbers
SEED_RANGE = 2 ** 31 - 1


def add_dropped(base: torch.Tensor, branch: torch.Tensor, p: float) -> torch.Tensor:
    """base + dropout(branch, p) (training), in base's dtype; base and branch have one shape."""
    if p == 0:
        return base + branch.to(base.dtype)
    if not fused_runs_on(base, branch):
        return base + F.dropout(branch, p, training=True).to(base.dtype)
    seed = int(torch.randint(SEED_RANGE, (), dtype=torch.int64, device="cpu"))  # never a GPU read
    return _AddDropped.apply(base, branch, float(p), seed)


def fused_runs_on(base: torch.Tensor, branch: torch.Tensor) -> bool:
    if torch.compiler.is_compiling() or triton is None:
        return False
    return (base.shape == branch.shape and base.device == branch.device and (base.is_cuda or INTERPRETED)
            and base.is_floating_point() and branch.is_floating_point())


class _AddDropped(torch.autograd.Function):
    @staticmethod
    def forward(ctx, base, branch, p, seed):
        base, branch = base.contiguous(), branch.contiguous()
        out = torch.empty_like(base)
        _launch(_add_dropped_kernel, (base, branch), out, p, seed)
        ctx.p, ctx.seed, ctx.branch_dtype = p, seed, branch.dtype
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable  # the kernel's output has no graph: no silent zero 2nd order
    def backward(ctx, grad):
        if not ctx.needs_input_grad[1]:
            return grad, None, None, None
        grad = grad.contiguous()
        grad_branch = torch.empty(grad.shape, dtype=ctx.branch_dtype, device=grad.device)
        _launch(_dropped_grad_kernel, (grad,), grad_branch, ctx.p, ctx.seed)
        return grad, grad_branch, None, None


def _launch(kernel, inputs, out, p, seed):
    n = out.numel()
    grid = (triton.cdiv(n, 4 * QUARTER),)
    # Triton launches on the current device: the tensors' own (a model on another GPU than the current one)
    with torch.cuda.device(out.device) if out.is_cuda else contextlib.nullcontext():
        kernel[grid](*inputs, out, n, p, 1.0 / (1.0 - p), seed, QUARTER=QUARTER)


if triton is not None:
    @triton.jit
    def _keeps(seed, p, QUARTER: tl.constexpr):
        """Four keep masks, one per quarter of this program's elements, from one Philox draw each."""
        counter = tl.program_id(0).to(tl.int64) * QUARTER + tl.arange(0, QUARTER)
        r0, r1, r2, r3 = tl.rand4x(seed, counter)
        return r0 >= p, r1 >= p, r2 >= p, r3 >= p

    @triton.jit
    def _add_quarter(base_ptr, branch_ptr, out_ptr, n, scale, start, keep, QUARTER: tl.constexpr):
        offsets = start + tl.arange(0, QUARTER)
        inside = offsets < n
        base = tl.load(base_ptr + offsets, mask=inside).to(tl.float32)
        branch = tl.load(branch_ptr + offsets, mask=inside).to(tl.float32)
        out = base + tl.where(keep, branch * scale, 0.0)
        tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=inside)

    @triton.jit(do_not_specialize=["seed"])  # a new seed per call: no recompile on its value
    def _add_dropped_kernel(base_ptr, branch_ptr, out_ptr, n, p, scale, seed, QUARTER: tl.constexpr):
        k0, k1, k2, k3 = _keeps(seed, p, QUARTER)
        start = tl.program_id(0).to(tl.int64) * 4 * QUARTER
        _add_quarter(base_ptr, branch_ptr, out_ptr, n, scale, start, k0, QUARTER)
        _add_quarter(base_ptr, branch_ptr, out_ptr, n, scale, start + QUARTER, k1, QUARTER)
        _add_quarter(base_ptr, branch_ptr, out_ptr, n, scale, start + 2 * QUARTER, k2, QUARTER)
        _add_quarter(base_ptr, branch_ptr, out_ptr, n, scale, start + 3 * QUARTER, k3, QUARTER)

    @triton.jit
    def _grad_quarter(grad_ptr, out_ptr, n, scale, start, keep, QUARTER: tl.constexpr):
        offsets = start + tl.arange(0, QUARTER)
        inside = offsets < n
        grad = tl.load(grad_ptr + offsets, mask=inside).to(tl.float32)
        tl.store(out_ptr + offsets, tl.where(keep, grad * scale, 0.0).to(out_ptr.dtype.element_ty), mask=inside)

    @triton.jit(do_not_specialize=["seed"])
    def _dropped_grad_kernel(grad_ptr, out_ptr, n, p, scale, seed, QUARTER: tl.constexpr):
        """d out / d branch: the forward's mask, drawn again from its seed, times 1 / (1 - p)."""
        k0, k1, k2, k3 = _keeps(seed, p, QUARTER)
        start = tl.program_id(0).to(tl.int64) * 4 * QUARTER
        _grad_quarter(grad_ptr, out_ptr, n, scale, start, k0, QUARTER)
        _grad_quarter(grad_ptr, out_ptr, n, scale, start + QUARTER, k1, QUARTER)
        _grad_quarter(grad_ptr, out_ptr, n, scale, start + 2 * QUARTER, k2, QUARTER)
        _grad_quarter(grad_ptr, out_ptr, n, scale, start + 3 * QUARTER, k3, QUARTER)
