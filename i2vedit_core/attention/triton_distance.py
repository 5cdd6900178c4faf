"""Fused Triton kernel for the row distance d (see distance.py), CUDA only.

One program per (frame, block of queries) loops over heads; per head it streams key tiles twice:
pass 1 gets each row's log-sum-exp for source and edit (online softmax), pass 2 accumulates
|p_src - p_edit|. Only tiles live in registers/SRAM: memory is O(N), compute 4 QKᵀ per head.
When the caller already has both log-sum-exps (flash attention returns them with its output),
pass 1 is skipped: 2 QKᵀ per head.
Runs on CPU tensors under TRITON_INTERPRET=1 (how the tests check its numerics).
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # optional at runtime: distance.py falls back to query chunks
    triton = None

BLOCK_M, BLOCK_N = 64, 64
LOG2E = 1.4426950408889634


def available() -> bool:
    return triton is not None


def supports(q: torch.Tensor) -> bool:
    dim = q.shape[-1]
    return available() and 16 <= dim <= 256 and dim & (dim - 1) == 0 \
        and q.dtype in (torch.float16, torch.bfloat16, torch.float32)


def row_distance(q_src, k_src, q, k, lse_src=None, lse=None, block_m: int = BLOCK_M,
                 block_n: int = BLOCK_N) -> torch.Tensor:
    """d (B, N) float32; lse_src/lse: optional natural-log log-sum-exps (B, H, >= N) of the scaled logits."""
    if not supports(q):
        raise ValueError("the Triton row distance needs triton and a power-of-two head dim in [16, 256]: "
                         "use distance.chunked_row_distance")
    q_src, k_src, q, k = (t.contiguous() for t in (q_src, k_src, q, k))
    frames, heads, tokens, dim = q.shape
    out = torch.empty(frames, tokens, dtype=torch.float32, device=q.device)
    has_lse = lse_src is not None and lse is not None
    if has_lse and (lse_src.stride() != lse.stride() or lse.stride(2) != 1):
        lse_src, lse = lse_src.contiguous(), lse.contiguous()
    lse_src, lse = (lse_src, lse) if has_lse else (out, out)  # dummies: never read without HAS_LSE
    strides = (lse.stride(0), lse.stride(1)) if has_lse else (0, 0)
    grid = (triton.cdiv(tokens, block_m), frames)
    # fp32 inputs use exact products (the 1e-5 reference check); half inputs use tensor cores.
    _row_distance_kernel[grid](q_src, k_src, q, k, lse_src, lse, out, tokens, k.shape[2], heads,
                               dim ** -0.5 * LOG2E, *strides, DIM=dim, BLOCK_M=block_m, BLOCK_N=block_n,
                               HAS_LSE=has_lse, PRECISION="ieee" if q.dtype == torch.float32 else "tf32")  # tf32 = the default
    return out


if triton is not None:
    @triton.jit
    def _scores(q, k_ptr, offs_n, n_keys, DIM: tl.constexpr, PRECISION: tl.constexpr):
        offs_d = tl.arange(0, DIM)
        valid = offs_n < n_keys
        kt = tl.load(k_ptr + offs_n[None, :] * DIM + offs_d[:, None], mask=valid[None, :], other=0.0)
        s = tl.dot(q, kt, input_precision=PRECISION)
        return tl.where(valid[None, :], s, float("-inf"))

    @triton.jit
    def _row_lse2(q, k_ptr, n_keys, scale2, DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
        """Base-2 log-sum-exp of each row of (q kᵀ) * scale2, by online softmax over key tiles."""
        m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        total = tl.zeros((BLOCK_M,), tl.float32)
        for start in range(0, n_keys, BLOCK_N):
            s = _scores(q, k_ptr, start + tl.arange(0, BLOCK_N), n_keys, DIM, PRECISION) * scale2
            m_new = tl.maximum(m, tl.max(s, 1))
            total = total * tl.exp2(m - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
            m = m_new
        return m + tl.log2(total)

    @triton.jit
    def _row_distance_kernel(qs_ptr, ks_ptr, qe_ptr, ke_ptr, lse_s_ptr, lse_e_ptr, out_ptr, n_tokens, n_keys,
                             heads, scale2, lse_frame_stride, lse_head_stride, DIM: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_LSE: tl.constexpr,
                             PRECISION: tl.constexpr):
        block, frame = tl.program_id(0), tl.program_id(1)
        offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, DIM)
        rows = offs_m < n_tokens
        acc = tl.zeros((BLOCK_M,), tl.float32)
        for h in range(heads):
            q_off = ((frame * heads + h) * n_tokens).to(tl.int64) * DIM
            k_off = ((frame * heads + h) * n_keys).to(tl.int64) * DIM
            q_ptrs = offs_m[:, None] * DIM + offs_d[None, :]
            qs = tl.load(qs_ptr + q_off + q_ptrs, mask=rows[:, None], other=0.0)
            qe = tl.load(qe_ptr + q_off + q_ptrs, mask=rows[:, None], other=0.0)
            if HAS_LSE:
                lse_ptrs = frame * lse_frame_stride + h * lse_head_stride + offs_m
                lse_s = tl.load(lse_s_ptr + lse_ptrs, mask=rows, other=0.0) * 1.4426950408889634
                lse_e = tl.load(lse_e_ptr + lse_ptrs, mask=rows, other=0.0) * 1.4426950408889634
            else:
                lse_s = _row_lse2(qs, ks_ptr + k_off, n_keys, scale2, DIM, BLOCK_M, BLOCK_N, PRECISION)
                lse_e = _row_lse2(qe, ke_ptr + k_off, n_keys, scale2, DIM, BLOCK_M, BLOCK_N, PRECISION)
            for start in range(0, n_keys, BLOCK_N):
                offs_n = start + tl.arange(0, BLOCK_N)
                ps = tl.exp2(_scores(qs, ks_ptr + k_off, offs_n, n_keys, DIM, PRECISION) * scale2 - lse_s[:, None])
                pe = tl.exp2(_scores(qe, ke_ptr + k_off, offs_n, n_keys, DIM, PRECISION) * scale2 - lse_e[:, None])
                acc += tl.sum(tl.abs(ps - pe), 1)
        d = tl.minimum(tl.maximum(acc / heads, 0.0), 2.0) * 0.5
        tl.store(out_ptr + frame * n_tokens + offs_m, d, mask=rows)
