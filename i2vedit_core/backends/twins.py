"""What the ComfyUI and diffusers backends must do identically, defined once.

Both backends adapt the same SVD UNet through different module trees (SGM vs diffusers paths); the
rules below are where they would otherwise drift apart: the attention head split, a layer's
downscale factor, the LoRA's init draw, and when loading a LoRA needs a fresh adapter.
"""

from typing import Optional, Tuple

import torch


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, heads * d) projections -> (B, heads, N, d), the layout the attention controller takes."""
    return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


def merge_heads(out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, heads, N, d) attention output -> (B, N, heads * d) in the projections' dtype, for to_out."""
    batch, _, seq, _ = out.shape
    return out.transpose(1, 2).reshape(batch, seq, -1).to(dtype)


def downscale(part: str, level: int, levels: int) -> int:
    """Latent width / layer width: the down path's level l is 2**l below the latent, the up path mirrors
    it (its level counts from the bottom), the middle block sits at the lowest level."""
    if part == "mid":
        return 2 ** (levels - 1)
    if part not in ("down", "up"):
        raise ValueError(f"unknown UNet part {part!r}")
    return 2 ** (level if part == "down" else levels - 1 - level)


def lora_generator(generator: Optional[torch.Generator]) -> torch.Generator:
    """The LoRA init's generator: the caller's (a CPU generator), else seed 0."""
    return generator if generator is not None else torch.Generator().manual_seed(0)


def lora_down_init(shape: Tuple[int, int], rank: int, generator: torch.Generator) -> torch.Tensor:
    """down ~ N(0, (1/r)^2), one draw per adapted Linear in SGM-path order of the UNet (both backends
    walk the same Linears in that order), on the CPU: the same seed gives the same LoRA anywhere."""
    return torch.randn(shape, generator=generator) / rank


def needs_fresh_adapter(attached, spec) -> bool:
    """Loading a LoRA of `spec` reuses the attached adapter only if it has the same tensors and dropout."""
    return attached is None or not attached.same_shape(spec) or attached.dropout != spec.dropout
