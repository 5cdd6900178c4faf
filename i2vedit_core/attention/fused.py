"""The fused attention kernels of the controlled layers, in ComfyUI's order, and the log-sum-exp the matching reads.

PyTorch's SDPA tries FlashAttention-2 first; ComfyUI asks for cuDNN's fused attention first on CUDA
(`comfy/ops.py`), which on an H200 runs SVD's spatial self-attention 1.1-1.6x faster (`bench/op_sources.py`,
docs/PERFORMANCE.md run 10). The layers the controller runs used PyTorch's order, so an edit's attention was
slower than the same UNet's plain forward. Both backends now use ComfyUI's order here; where a kernel refuses a
call (GPU, head size, layout), SDPA takes the next one, as it does for ComfyUI.
"""

import functools
import warnings
from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

try:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    HOST_ORDER = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                  SDPBackend.MATH]
except ImportError:  # torch without the attention module: PyTorch's own order
    sdpa_kernel = None


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / √d) v, cuDNN's kernel first on CUDA."""
    if q.is_cuda and _can_set_priority():
        with sdpa_kernel(HOST_ORDER, set_priority=True):
            return F.scaled_dot_product_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


def attention_with_lse(q, k, v, want_lse: bool = True) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(out, each row's natural-log log-sum-exp (B, H, N) or None): cuDNN's or FlashAttention-2's kernel returns
    it with the output on CUDA in half precision; elsewhere (or when both refuse) plain SDPA and None, and the
    distance kernel finds the log-sum-exp itself."""
    if want_lse and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        kernels = [kernel for kernel, enabled in ((cudnn_kernel, torch.backends.cuda.cudnn_sdp_enabled),
                                                  (flash_kernel, torch.backends.cuda.flash_sdp_enabled)) if enabled()]
        fused = first_with_lse(kernels, q, k, v)
        if fused is not None:
            return fused
        if kernels:  # switched off by the user is not a refusal
            _warn_fallback()
    return sdpa(q, k, v), None


def cudnn_kernel(q, k, v):
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False)[:2]
    return out, lse.squeeze(-1) if lse.dim() == 4 else lse  # cuDNN keeps a trailing 1: (B, H, N, 1)


def flash_kernel(q, k, v):
    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False)[:2]


def first_with_lse(kernels: Sequence[Callable], q, k, v) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """The (out, lse) of the first kernel that accepts the call, or None. Out of memory is not a refusal: re-raised."""
    for kernel in kernels:
        try:
            out, lse = kernel(q, k, v)[:2]
            return out, lse
        except torch.cuda.OutOfMemoryError:
            raise
        except (RuntimeError, NotImplementedError):
            continue
    return None


@functools.lru_cache(maxsize=None)
def _warn_fallback() -> None:
    """Once: every attention call of every step would hit the same refusals."""
    warnings.warn("neither cuDNN's nor flash attention accepts the matched-attention calls on this GPU; using plain "
                  "SDPA (slower, same result)", RuntimeWarning, stacklevel=3)


@functools.lru_cache(maxsize=None)
def _can_set_priority() -> bool:
    import inspect

    return sdpa_kernel is not None and "set_priority" in inspect.signature(sdpa_kernel).parameters
