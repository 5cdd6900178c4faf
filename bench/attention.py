"""GPU bench of spatial attention matching at SVD's top level (14 frames, 72x128 = 9216 tokens, 5 heads, 64 dim).

    python bench/attention.py

1. Accuracy: the Triton row distance d (bf16 inputs; own log-sum-exp and flash's) against a
   materialised fp32 reference on the same bf16 inputs, 2 frames.
2. Time of one matched spatial attn1 call on the CFG batch [uncond, cond] (28 rows), as the controller
   runs it, against (a) plain SDPA of the same batch and (b) the official approach: per frame,
   materialised fp32 softmax maps, mask, weighted map times v (OFFICIAL_CODE_NOTES §4a).
Prints a table; needs CUDA and triton. About a minute on an H100.
"""

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from i2vedit_core.attention import (AttentionController, AttentionSite, BatchLayout, MatchSettings,  # noqa: E402
                                    naive_row_distance, threshold_ramp)
from i2vedit_core.attention import triton_distance  # noqa: E402
from i2vedit_core.attention.matching import attention_with_lse  # noqa: E402

FRAMES, TOKENS, HEADS, DIM = 14, 9216, 5, 64
DTYPE = torch.bfloat16
PATH = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"


def timed(fn, reps=5, warmup=2):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def peak(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 30


def inputs(frames, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    make = lambda: torch.randn(frames, HEADS, TOKENS, DIM, device="cuda", generator=g, dtype=DTYPE)
    q_src, k_src, noise_q, noise_k = make(), make(), make(), make()
    # The edit is the source plus a perturbation: d spans the whole [0, 1] range, as in real edits.
    scale = torch.linspace(0.05, 2.0, TOKENS, device="cuda").view(1, 1, TOKENS, 1).to(DTYPE)
    return q_src, k_src, q_src + scale * noise_q, k_src + 0.3 * noise_k


def accuracy():
    q_src, k_src, q, k = inputs(2)
    ref = naive_row_distance(q_src, k_src, q, k)
    own = triton_distance.row_distance(q_src, k_src, q, k)
    v = torch.randn_like(q)
    _, lse_src = attention_with_lse(q_src, k_src, v)
    _, lse = attention_with_lse(q, k, v)
    rows = [("triton d, own log-sum-exp", float((own - ref).abs().max()))]
    if lse_src is not None and lse is not None:
        given = triton_distance.row_distance(q_src, k_src, q, k, lse_src, lse)
        rows.append(("triton d, flash log-sum-exp", float((given - ref).abs().max())))
    return rows, (float(ref.min()), float(ref.mean()), float(ref.max()))


def official_layer(q_src, k_src, q, k, v, thresholds):
    """Per frame of the CFG batch: materialised fp32 maps (official chunk size 1)."""
    out = torch.empty_like(q)
    for f in range(2 * FRAMES):
        a = torch.softmax(q[f].float() @ k[f].float().transpose(-1, -2) * DIM ** -0.5, -1)
        if f >= FRAMES:
            s = f - FRAMES
            a_src = torch.softmax(q_src[s].float() @ k_src[s].float().transpose(-1, -2) * DIM ** -0.5, -1)
            d = (a_src - a).abs().mean(0).sum(-1).clamp(0, 2) / 2
            m = torch.where(d >= thresholds[s], torch.ones_like(d), d)[None, :, None]
            a = (1 - m) * a_src + m * a
        out[f] = (a.to(DTYPE) @ v[f])
    return out


def main():
    if not torch.cuda.is_available() or not triton_distance.available():
        sys.exit("bench/attention.py needs a CUDA GPU and triton")
    torch.backends.cuda.matmul.allow_tf32 = True
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, {DTYPE}, frames {FRAMES}, tokens {TOKENS}, "
          f"heads {HEADS}, dim {DIM}")
    rows, (lo, mean, hi) = accuracy()
    print(f"\n## Row distance d vs materialised fp32 reference (2 frames; reference d min {lo:.3f} mean {mean:.3f} "
          f"max {hi:.3f})")
    print("| kernel | max abs error |\n|---|---|")
    for name, err in rows:
        print(f"| {name} | {err:.2e} |")

    q_src, k_src, q_c, k_c = inputs(FRAMES, seed=1)
    g = torch.Generator(device="cuda").manual_seed(2)
    q = torch.cat([torch.randn_like(q_c), q_c])
    k = torch.cat([torch.randn_like(k_c), k_c])
    v = torch.randn(2 * FRAMES, HEADS, TOKENS, DIM, device="cuda", generator=g, dtype=DTYPE)
    controller = AttentionController(MatchSettings())
    controller.begin_step(0)
    layout = lambda rows: BatchLayout(rows, FRAMES, TOKENS, (72, 128))
    controller.source_pass()(q_src, k_src, v[:FRAMES], AttentionSite("spatial", PATH, 1, layout(("source",))))
    site = AttentionSite("spatial", PATH, 1, layout(("uncond", "cond")))
    edit = controller.edit_pass()
    thresholds = threshold_ramp((0.35, 0.35), FRAMES, "cuda")
    matched = lambda: edit(q, k, v, site)
    plain = lambda: F.scaled_dot_product_attention(q, k, v)
    official = lambda: official_layer(q_src, k_src, q, k, v, thresholds)
    d_own = lambda: triton_distance.row_distance(q_src, k_src, q_c, k_c)
    agreement = float((matched() - official()).abs().max())

    print("\n## One top-level spatial attn1 call, CFG batch of 28 rows (median of 5, ms)")
    print("| path | time (ms) | x plain SDPA | peak extra memory (GiB) |\n|---|---|---|---|")
    base = timed(plain)
    for name, fn, reps in [("plain SDPA (floor)", plain, 5), ("matched layer (ours)", matched, 5),
                           ("  of which: triton d alone, 14 frames", d_own, 5),
                           ("official materialised, per frame", official, 2)]:
        ms = timed(fn, reps=reps, warmup=1)
        print(f"| {name} | {ms:.2f} | {ms / base:.2f} | {peak(fn):.2f} |")
    print(f"\nmatched layer vs official outputs: max abs difference {agreement:.2e} (bf16 outputs)")
    print(f"mask: {float((controller.buffer.masks[PATH] == 1).float().mean()):.2%} of tokens at M = 1")


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"\n(total {time.time() - t0:.0f} s)")
