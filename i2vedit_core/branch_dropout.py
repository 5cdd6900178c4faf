"""base + dropout(branch): the motion LoRA's output with dropout on its branch (ALGORITHM 4), fused on CUDA.

Eagerly, dropout on the branch output draws a mask, scales and adds in three passes over a tensor as large
as the Linear's output, keeps a byte-per-element mask for backward and multiplies by it there: on SVD's
192 temporal Linears at 512x896 that is about 6.8 G elements per training step. On CUDA with Triton one
kernel adds the dropped branch and keeps only a seed; backward draws the same mask again from it.

The distribution is dropout's (each element kept with probability 1 - p, kept values scaled by 1 / (1 - p));
the random stream is Triton's Philox, not F.dropout's. Its key is a seed drawn on the device once per UNet
call (`DropoutSeed`) and the Linear's site number, and the kernel reads the seed from device memory: nothing
random happens on the host, so a checkpointed layer's recomputation redraws the same mask from the call's
seed, and a captured CUDA graph draws a new seed at each replay (training_graph.py). Where the kernel does not
run (CPU tensors, no Triton, inside torch.compile, where inductor fuses F.dropout itself) it is
base + F.dropout(branch). Runs on CPU tensors under TRITON_INTERPRET=1 (how the tests check it).
docs/PERFORMANCE.md has the measured effect.
"""

import contextlib
import os
from typing import Optional

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
SITES = 4096  # Philox key = seed * SITES + site: the Linears of one call draw independent masks
MAX_ELEMENTS = 4 * 2 ** 31  # 32-bit Philox counters, one per 4 elements


class DropoutSeed:
    """The seed of one UNet call's dropped branches: drawn on the device at first use (no host read; a CUDA
    graph replays the draw), then shared by the call's Linears and their recomputation in backward."""

    def __init__(self):
        self._tensor = None

    def on(self, device: torch.device) -> torch.Tensor:
        if self._tensor is None:
            self._tensor = torch.randint(SEED_RANGE, (), dtype=torch.int64, device=device)
        return self._tensor


class CallSeeds:
    """The DropoutSeed of the UNet call running now, for Linears that cannot be handed it (the diffusers
    backend's peft layers): a call sets one for its duration, and a checkpointed layer's recomputation sets the
    same one again."""

    def __init__(self):
        self.current: Optional[DropoutSeed] = None

    @contextlib.contextmanager
    def call(self, seed: Optional[DropoutSeed] = None):
        previous, self.current = self.current, seed if seed is not None else DropoutSeed()
        try:
            yield self.current
        finally:
            self.current = previous


def add_dropped(base: torch.Tensor, branch: torch.Tensor, p: float, seed: Optional[DropoutSeed] = None,
                site: int = 0) -> torch.Tensor:
    """base + dropout(branch, p) (training), in base's dtype; base and branch have one shape. seed: the UNet
    call's (None: a fresh one); site: this Linear's number in [0, SITES) (a call's Linears get distinct masks)."""
    if p == 0:
        return base + branch.to(base.dtype)
    if not fused_runs_on(base, branch):
        return base + F.dropout(branch, p, training=True).to(base.dtype)
    if not 0 <= site < SITES:
        raise ValueError(f"dropout site must be in [0, {SITES}), got {site}")
    return _AddDropped.apply(base, branch, float(p), (seed or DropoutSeed()).on(base.device), int(site))


def fused_runs_on(base: torch.Tensor, branch: torch.Tensor) -> bool:
    if torch.compiler.is_compiling() or triton is None:
        return False
    return (base.shape == branch.shape and base.device == branch.device and (base.is_cuda or INTERPRETED)
            and base.is_floating_point() and branch.is_floating_point() and base.numel() <= MAX_ELEMENTS)


class _AddDropped(torch.autograd.Function):
    @staticmethod
    def forward(ctx, base, branch, p, seed, site):
        base, branch = base.contiguous(), branch.contiguous()
        out = torch.empty_like(base)
        _launch(_add_dropped_kernel, (base, branch), out, p, seed, site)
        ctx.p, ctx.seed, ctx.site, ctx.branch_dtype = p, seed, site, branch.dtype
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable  # the kernel's output has no graph: no silent zero 2nd order
    def backward(ctx, grad):
        if not ctx.needs_input_grad[1]:
            return grad, None, None, None, None
        grad = grad.contiguous()
        grad_branch = torch.empty(grad.shape, dtype=ctx.branch_dtype, device=grad.device)
        _launch(_dropped_grad_kernel, (grad,), grad_branch, ctx.p, ctx.seed, ctx.site)
        return grad, grad_branch, None, None, None


def _launch(kernel, inputs, out, p, seed, site):
    n = out.numel()
    grid = (triton.cdiv(n, 4 * QUARTER),)
    # Triton launches on the current device: the tensors' own (a model on another GPU than the current one)
    with torch.cuda.device(out.device) if out.is_cuda else contextlib.nullcontext():
        kernel[grid](*inputs, out, n, p, 1.0 / (1.0 - p), seed, site, QUARTER=QUARTER)


if triton is not None:
    @triton.jit
    def _keeps(seed_ptr, site, p, QUARTER: tl.constexpr):
        """Four keep masks, one per quarter of this program's elements, from one Philox draw each: 32-bit
        counters under the 64-bit key (call seed, site)."""
        key = tl.load(seed_ptr) * 4096 + site  # SITES (a jit function reads no module global)
        counter = (tl.program_id(0) * QUARTER + tl.arange(0, QUARTER)).to(tl.uint32)
        r0, r1, r2, r3 = tl.rand4x(key, counter)
        return r0 >= p, r1 >= p, r2 >= p, r3 >= p

    @triton.jit
    def _add_quarter(base_ptr, branch_ptr, out_ptr, n, scale, start, keep, QUARTER: tl.constexpr):
        offsets = start + tl.arange(0, QUARTER)
        inside = offsets < n
        base = tl.load(base_ptr + offsets, mask=inside).to(tl.float32)
        branch = tl.load(branch_ptr + offsets, mask=inside).to(tl.float32)
        out = base + tl.where(keep, branch * scale, 0.0)
        tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=inside)

    @triton.jit(do_not_specialize=["site"])  # one compiled kernel for every site
    def _add_dropped_kernel(base_ptr, branch_ptr, out_ptr, n, p, scale, seed_ptr, site, QUARTER: tl.constexpr):
        k0, k1, k2, k3 = _keeps(seed_ptr, site, p, QUARTER)
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

    @triton.jit(do_not_specialize=["site"])
    def _dropped_grad_kernel(grad_ptr, out_ptr, n, p, scale, seed_ptr, site, QUARTER: tl.constexpr):
        """d out / d branch: the forward's mask, drawn again from its seed, times 1 / (1 - p)."""
        k0, k1, k2, k3 = _keeps(seed_ptr, site, p, QUARTER)
        start = tl.program_id(0).to(tl.int64) * 4 * QUARTER
        _grad_quarter(grad_ptr, out_ptr, n, scale, start, k0, QUARTER)
        _grad_quarter(grad_ptr, out_ptr, n, scale, start + QUARTER, k1, QUARTER)
        _grad_quarter(grad_ptr, out_ptr, n, scale, start + 2 * QUARTER, k2, QUARTER)
        _grad_quarter(grad_ptr, out_ptr, n, scale, start + 3 * QUARTER, k3, QUARTER)
