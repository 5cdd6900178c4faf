"""Row distance d between two attention maps without materialising them (ALGORITHM §5).

d[b, n] = clamp(mean_heads sum_keys |softmax(q_src k_srcᵀ s) - softmax(q k ᵀ s)|, 0, 2) / 2,
half the L1 distance of the two attention rows of query n of frame b, in [0, 1].
On CUDA with Triton a fused kernel streams key tiles; elsewhere query chunks bound the memory:
no intermediate exceeds `budget` elements.
"""

import torch

from ..backends.base import state_float

DEFAULT_BUDGET = 1 << 24  # elements per intermediate: 64 MiB in fp32


def row_distance(q_src: torch.Tensor, k_src: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                 budget: int = DEFAULT_BUDGET, use_triton: bool = True) -> torch.Tensor:
    """d (B, N) float32 (float64 for float64 inputs) for q (B, H, N, D) and k (B, H, Nk, D) of the source and of the edit."""
    _check_shapes(q_src, k_src, q, k)
    if use_triton and q.is_cuda:
        from . import triton_distance
        if triton_distance.supports(q):
            return triton_distance.row_distance(q_src, k_src, q, k)
    return chunked_row_distance(q_src, k_src, q, k, budget)


def chunked_row_distance(q_src, k_src, q, k, budget: int = DEFAULT_BUDGET) -> torch.Tensor:
    """Query chunks of whole frames, or of rows of one frame when a frame exceeds the budget."""
    frames, heads, tokens, dim = q.shape
    keys = k.shape[2]
    rows = budget // (heads * keys)  # query rows (all heads) whose logits fit the budget
    low_precision = q.dtype not in (torch.float32, torch.float64)
    if rows < 1 or (low_precision and heads * keys * dim > budget):
        raise ValueError(f"chunk budget {budget} is below one query row of attention "
                         f"({heads} heads x {keys} keys{f' x {dim} dims' if low_precision else ''}): raise it")
    group, chunk = max(1, rows // tokens), min(tokens, rows)
    if low_precision:  # the fp32 copy of the group's keys must fit too
        group = max(1, min(group, budget // (heads * keys * dim)))
    out = torch.empty(frames, tokens, dtype=state_float(q[:0]).dtype, device=q.device)
    for b in range(0, frames, group):
        ks, ke = state_float(k_src[b:b + group]), state_float(k[b:b + group])
        for i in range(0, tokens, chunk):
            a = _probabilities(q_src[b:b + group, :, i:i + chunk], ks)
            a.sub_(_probabilities(q[b:b + group, :, i:i + chunk], ke)).abs_()
            out[b:b + group, i:i + chunk] = a.sum(-1).mean(1)
    return out.clamp_(0, 2).div_(2)


def naive_row_distance(q_src, k_src, q, k) -> torch.Tensor:
    """The materialised reference (full attention maps): tests and benchmarks only."""
    a_src = torch.softmax(q_src.float() @ k_src.float().transpose(-1, -2) * q.shape[-1] ** -0.5, -1)
    a = torch.softmax(q.float() @ k.float().transpose(-1, -2) * q.shape[-1] ** -0.5, -1)
    return (a_src - a).abs().mean(1).sum(-1).clamp(0, 2) / 2


def _probabilities(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    logits = torch.matmul(state_float(q), k.transpose(-1, -2))
    return torch.softmax(logits.mul_(q.shape[-1] ** -0.5), dim=-1)


def _check_shapes(q_src, k_src, q, k) -> None:
    if q_src.shape != q.shape or k_src.shape != k.shape or q.ndim != 4 or k.shape[:2] != q.shape[:2] \
            or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"row distance needs matching (B, H, N, D) queries and (B, H, Nk, D) keys, got "
                         f"q_src {tuple(q_src.shape)}, k_src {tuple(k_src.shape)}, q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}")
