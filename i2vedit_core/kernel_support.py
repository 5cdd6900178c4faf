"""Where the pack's Triton layer kernels (group_norm.py, layer_norm.py, geglu.py) can run, shared by them.

Triton is optional at run time: without it every layer is PyTorch's. The kernels run on CUDA tensors outside
torch.compile (inside, inductor compiles PyTorch's ops itself), and on CPU tensors under TRITON_INTERPRET=1, which
Triton reads once at import (how the tests check the kernels' numerics).
"""

import contextlib
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def kernels_run_on(x: torch.Tensor) -> bool:
    return triton is not None and not torch.compiler.is_compiling() and (x.is_cuda or INTERPRETED)


def on_device(x: torch.Tensor):
    """The context a launch on x's device needs (x's CUDA device current)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
