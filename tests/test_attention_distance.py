"""Row distance d and matched spatial attention against materialised references (fp32, 1e-5)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from interpreted import run_interpreted
from i2vedit_core.attention import chunked_row_distance, matched_attention, naive_row_distance, threshold_ramp
from i2vedit_core.attention.matching import difference_mask

# (frames, heads, queries, keys, head_dim, budget): token counts not divisible by the chunk, one and
# many heads, more keys than queries, budgets from one query row to several whole frames.
SHAPES = [(2, 1, 37, 37, 8, 37 * 5), (3, 5, 50, 50, 16, 5 * 50 * 7), (1, 20, 24, 24, 8, 20 * 24),
          (2, 2, 30, 45, 16, 2 * 45 * 30 * 2), (4, 3, 16, 16, 8, 1 << 20)]


def _qk(frames, heads, queries, keys, dim, seed=0, spread=1.5):
    g = torch.Generator().manual_seed(seed)
    q_src, q = (torch.randn(frames, heads, queries, dim, generator=g) * spread for _ in range(2))
    k_src, k = (torch.randn(frames, heads, keys, dim, generator=g) * spread for _ in range(2))
    # Make the edit partly a small perturbation of the source so d spans [0, 1], not only ~1.
    q[:, :, : queries // 2] = q_src[:, :, : queries // 2] + 0.05 * q[:, :, : queries // 2]
    k = k_src + 0.2 * k
    return q_src, k_src, q, k


@pytest.mark.parametrize("shape", SHAPES)
def test_chunked_distance_equals_materialised_reference(shape):
    *dims, budget = shape
    q_src, k_src, q, k = _qk(*dims)
    d = chunked_row_distance(q_src, k_src, q, k, budget)
    ref = naive_row_distance(q_src, k_src, q, k)
    assert d.shape == (dims[0], dims[2])
    assert float(ref.min()) < 0.3 and float(ref.max()) > 0.5  # the data exercises the whole range
    torch.testing.assert_close(d, ref, atol=1e-5, rtol=0)


def test_distance_is_zero_for_identical_attention_and_half_l1_by_hand():
    q_src, k_src, _, _ = _qk(2, 3, 10, 10, 8)
    assert float(chunked_row_distance(q_src, k_src, q_src, k_src, 3 * 10).abs().max()) == 0.0
    # One head, two keys: rows [p, 1-p] vs [r, 1-r] are |p - r| apart (half of the L1 2|p - r|).
    q = torch.tensor([[[[1.0, 0.0]]]])
    k_src, k = torch.tensor([[[[0.0, 0.0], [0.0, 0.0]]]]), torch.tensor([[[[2.0, 0.0], [0.0, 0.0]]]])
    p = torch.softmax(torch.tensor([2.0, 0.0]) * 2 ** -0.5, 0)[0]
    assert float(chunked_row_distance(q, k_src, q, k, 2)[0, 0]) == pytest.approx(float(p) - 0.5, abs=1e-7)


def test_float64_inputs_give_a_float64_distance():
    """The parity harness runs float64: the distance (a blend weight below the threshold) must not round to
    float32 there (6e-8 per layer and step, which the harness's tiny model amplifies)."""
    gen = torch.Generator().manual_seed(3)
    q_src, k_src, q, k = (torch.randn(2, 2, 16, 8, generator=gen, dtype=torch.float64) for _ in range(4))
    d = chunked_row_distance(q_src, k_src, q, k)
    a_src = torch.softmax(q_src @ k_src.transpose(-1, -2) / 8 ** 0.5, -1)
    a = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, -1)
    reference = (a_src - a).abs().mean(1).sum(-1).clamp(0, 2) / 2
    assert d.dtype == torch.float64
    assert float((d - reference).abs().max()) < 1e-14
    assert chunked_row_distance(q_src.float(), k_src.float(), q.float(), k.float()).dtype == torch.float32


def test_budget_below_one_row_is_refused_with_the_fix():
    q_src, k_src, q, k = _qk(1, 2, 8, 8, 4)
    with pytest.raises(ValueError, match="raise it"):
        chunked_row_distance(q_src, k_src, q, k, budget=2 * 8 - 1)


class _LargestAllocation(TorchDispatchMode):
    """Records the largest tensor any non-view op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("budget", [3 * 60 * 7, 3 * 60 * 60 + 5, 3 * 60 * 60 * 2])
def test_no_intermediate_exceeds_the_chunk_budget(budget):
    frames, heads, tokens, dim = 3, 3, 60, 8  # one frame's full maps: 10,800 elements
    q_src, k_src, q, k = _qk(frames, heads, tokens, tokens, dim)
    with _LargestAllocation() as spy:
        chunked_row_distance(q_src, k_src, q, k, budget)
    assert spy.largest <= budget
    assert spy.largest >= min(budget, heads * tokens * tokens) // 2  # the chunks do use the budget
    # The whole matched layer: nothing larger than the budget or than its own q/k/v/output.
    v = torch.randn(frames, heads, tokens, dim)
    with _LargestAllocation() as spy:
        matched_attention(q_src, k_src, q, k, v, threshold_ramp((0.3, 0.6), frames), budget)
    assert spy.largest <= max(budget, q.numel())


def _materialised_matching(q_src, k_src, q, k, v, thresholds):
    """The official per-frame path: weighted attention maps times the edit's v."""
    a_src = torch.softmax(q_src @ k_src.transpose(-1, -2) * q.shape[-1] ** -0.5, -1)
    a = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, -1)
    d = ((a_src - a).abs().mean(1).sum(-1).clamp(0, 2) / 2)
    m = torch.where(d >= thresholds[:, None], torch.ones_like(d), d)
    w = m[:, None, :, None]
    return ((1 - w) * a_src + w * a) @ v, m


@pytest.mark.parametrize("shape", SHAPES[:4])
@pytest.mark.parametrize("thresholds", [(0.35, 0.35), (0.1, 0.9), (0.0, 1.0)])
def test_matched_attention_equals_materialised_reference(shape, thresholds):
    *dims, budget = shape
    q_src, k_src, q, k = _qk(*dims, seed=1)
    v = torch.randn(dims[0], dims[1], dims[3], dims[4], generator=torch.Generator().manual_seed(2))
    ramp = threshold_ramp(thresholds, dims[0])
    out, m = matched_attention(q_src, k_src, q, k, v, ramp, budget)
    ref_out, ref_m = _materialised_matching(q_src, k_src, q, k, v, ramp)
    torch.testing.assert_close(m, ref_m, atol=1e-5, rtol=0)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=0)
    if thresholds == (0.35, 0.35):
        assert 0 < float((m == 1).float().mean()) < 1  # both mask branches are exercised


def test_threshold_ramp_and_mask():
    torch.testing.assert_close(threshold_ramp((0.2, 0.5), 4), torch.tensor([0.2, 0.3, 0.4, 0.5]))
    d = torch.tensor([[0.1, 0.35, 0.5], [0.1, 0.35, 0.5]])
    m = difference_mask(d, torch.tensor([0.35, 0.6]))
    torch.testing.assert_close(m, torch.tensor([[0.1, 1.0, 1.0], [0.1, 0.35, 0.5]]))
    for bad in [(0.5, 1.2), (-0.1, 0.3), (0.35,)]:
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            threshold_ramp(bad, 3)


def test_bf16_inputs_within_bf16_tolerance():
    q_src, k_src, q, k = _qk(2, 3, 40, 40, 16)
    d = chunked_row_distance(*(t.bfloat16() for t in (q_src, k_src, q, k)), budget=3 * 40 * 16)
    assert float((d - naive_row_distance(q_src, k_src, q, k)).abs().max()) < 2e-2


_INTERPRETED_CHECK = """
import json, torch
from i2vedit_core.attention import naive_row_distance, triton_distance
g = torch.Generator().manual_seed(3)
errors = []
for frames, heads, tokens, keys, dim in [(2, 1, 37, 37, 16), (1, 5, 50, 70, 32), (3, 2, 16, 16, 16)]:
    q_src, q = (torch.randn(frames, heads, tokens, dim, generator=g) * 1.5 for _ in range(2))
    k_src = torch.randn(frames, heads, keys, dim, generator=g) * 1.5
    k = k_src + 0.2 * torch.randn(frames, heads, keys, dim, generator=g)
    q[:, :, :tokens // 2] = q_src[:, :, :tokens // 2]
    ref = naive_row_distance(q_src, k_src, q, k)
    lse = lambda a, b: torch.logsumexp(a @ b.transpose(-1, -2) * dim ** -0.5, -1)
    fused = triton_distance.row_distance(q_src, k_src, q, k, block_m=16, block_n=32)
    given = triton_distance.row_distance(q_src, k_src, q, k, lse(q_src, k_src), lse(q, k), block_m=16, block_n=32)
    errors.append([float((fused - ref).abs().max()), float((given - ref).abs().max()), float(ref.min()),
                   float(ref.max())])
print(json.dumps(errors))
"""


def test_triton_kernel_equals_reference_under_interpreter():
    """The CUDA kernel's numerics on the CPU: triton must be imported with TRITON_INTERPRET=1 set
    (its own tl.sum/tl.max are jit functions too), hence a fresh interpreter process."""
    pytest.importorskip("triton")
    for fused, given, low, high in run_interpreted(_INTERPRETED_CHECK, timeout=120):
        assert fused < 1e-5 and given < 1e-5
        assert low < 0.2 and high > 0.5  # near-identical and different rows both present
