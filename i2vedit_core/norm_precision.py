"""Where the pack's normalisation layers keep the activations' dtype under autocast (docs/FIDELITY.md D10).

Autocast runs LayerNorm and GroupNorm in float32: it copies a bf16 input to float32, writes a float32 output,
and every Linear or conv that reads the output copies it back to bf16 (each of the three q, k, v projections
its own copy), then backward undoes each copy. In a training step of SVD's UNet those copies and float32 passes
took about a tenth of the GPU time (`bench/op_sources.py --pack`, docs/PERFORMANCE.md run 11). The pack's norms
instead read the bf16 input, compute in float32 and write bf16: the rounding autocast does at the consumer's
input, done once at the norm's output. Where a norm feeds a Linear or a conv that is the same rounding point (the
float32 value itself differs from PyTorch's by summation order); a GroupNorm followed by SiLU now rounds before the
SiLU as well (and SiLU's backward runs in bf16); gradients from several consumers add in bf16. Only where no
weight or bias of the norm trains (the pack's LoRA never adapts a norm), the input already has autocast's dtype,
and autocast is on; everywhere else the norms give PyTorch's dtypes and, up to summation order, its numbers.
"""

import torch


def keeps_activation_dtype(x: torch.Tensor, *params) -> bool:
    """Whether a norm of `x` with `params` (weight, bias; None for absent ones) writes x's dtype under autocast."""
    kind = x.device.type
    return (torch.is_autocast_enabled(kind) and x.dtype in (torch.float16, torch.bfloat16)
            and x.dtype == torch.get_autocast_dtype(kind)
            and not any(p is not None and p.requires_grad for p in params))
