"""The one seam between the algorithm and a concrete SVD implementation (DESIGN.md).

Everything in i2vedit_core outside `backends/` talks to SVD only through `SVDBackend`.
Latent convention: (B, F, 4, h, w) float32, scaled by the VAE factor, as the UNet sees them (float64
when a diffusers model runs in float64: the parity harness compares float64 runs; see `state_float`.
ComfyUI's backend always hands back float32).
"""

from dataclasses import dataclass, replace
from typing import ContextManager, Dict, List, Optional, Protocol, runtime_checkable

import torch


def state_float(tensor: torch.Tensor) -> torch.Tensor:
    """Latents, conditioning and Euler updates are float32 at least: float64 stays float64 (a float64
    model is run to compare against a reference at rounding level, and a float32 state would round every
    step to 6e-8, which a random tiny model's inversion amplifies 1e4-fold)."""
    return tensor if tensor.dtype == torch.float64 else tensor.float()


@dataclass(frozen=True)
class Conditioning:
    """What SVD is conditioned on, for B videos of F frames.

    image_embeds: (B, 1, D) CLIP image embedding.
    image_latents: (B, F, 4, h, w) unscaled VAE latent concatenated to the UNet input.
    time_ids: (B, 3) micro-conditioning, always [fps_id, motion_bucket_id, noise_aug_strength].
    """
    image_embeds: torch.Tensor
    image_latents: torch.Tensor
    time_ids: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.image_embeds.shape[0]

    def zeros_like(self) -> "Conditioning":
        """The unconditional branch of SVD's CFG: zero embedding and zero conditioning latent."""
        return replace(self, image_embeds=torch.zeros_like(self.image_embeds),
                       image_latents=torch.zeros_like(self.image_latents))

    @staticmethod
    def cat(*parts: "Conditioning") -> "Conditioning":
        return Conditioning(torch.cat([p.image_embeds for p in parts]), torch.cat([p.image_latents for p in parts]),
                            torch.cat([p.time_ids for p in parts]))


@runtime_checkable
class SVDBackend(Protocol):
    """A loaded SVD model: VAE, CLIP image encoder and the denoiser.

    Frames are float (N, 3, H, W) in [-1, 1]; H and W are multiples of 64.
    """
    device: torch.device
    latent_scale: float  # VAE scaling factor (0.18215 for SVD)

    def identity(self) -> str:
        """A fingerprint of the weights (not of the Python object): equal for the same model loaded twice,
        different after any weight change. Cache keys use it; a backend without it cannot be cached."""

    def encode(self, frames: torch.Tensor, chunk_size: int = 8, generator=None) -> torch.Tensor:
        """VAE mode of each frame, scaled: (N, 4, H/8, W/8) float32. generator: a draw from the posterior
        instead (mean + std·ε, ε one draw of the whole batch; the official inversion's `.sample()`)."""

    def decode(self, latents: torch.Tensor, chunk_size: int = 8) -> torch.Tensor:
        """Frames (N, 3, H, W) float32 in [-1, 1] from scaled latents (N, 4, h, w) of one clip."""

    def image_embedding(self, frames: torch.Tensor) -> torch.Tensor:
        """CLIP image embedding (N, D) float32 of each frame."""

    def denoise(self, x: torch.Tensor, sigma: float, cond: Conditioning, attention=None,
                lora_scale: float = 1.0, lora_slot: str = "clip") -> torch.Tensor:
        """D(x, sigma | cond) for x (B, F, 4, h, w) float32; returns float32 of the same shape.

        attention: an attention controller (i2vedit_core.attention) that every spatial and temporal
        self-attention call of this evaluation goes through; None = plain attention.
        lora_scale: scale of the motion LoRA if one is attached (0 = base model); ignored without one.
        lora_slot: "clip" (the attached LoRA) or "clip0" (clip 0's, loaded beside it: exact skip-interval).
        Differentiable: training calls it under autograd; sampling loops wrap it in no_grad.
        """


@runtime_checkable
class LoraBackend(Protocol):
    """An SVDBackend that can carry the motion LoRA (`i2vedit_core.lora`): one trainable adapter, plus
    clip 0's weights beside it for exact skip-interval.

    `denoise(..., lora_scale=s)` runs it at absolute scale s for that call (0 = base model).
    """

    def attach_lora(self, spec, generator: Optional[torch.Generator] = None) -> None:
        """A fresh adapter of `spec` (fp32; down seeded from `generator`, up zero), replacing any attached one."""

    def detach_lora(self) -> None:
        """Remove the adapter; the base model is unchanged."""

    def lora_parameters(self) -> List[torch.nn.Parameter]:
        """The adapter's trainable tensors (what the optimiser steps)."""

    def export_lora(self, metadata: Optional[Dict[str, str]] = None):
        """The attached adapter as a `MotionLora` (ComfyUI keys, fp32, CPU)."""

    def load_lora(self, lora, slot: str = "clip") -> None:
        """Load a `MotionLora` without reloading the model; ValueError naming its file if it does not fit.
        slot "clip0": a second, inference-only weight set beside the attached one (clip 0's LoRA), run by
        `denoise(..., lora_slot="clip0")`; detach_lora removes both."""

    def lora_training(self, gradient_checkpointing=False) -> ContextManager:
        """Context for training: adapter dropout active, optional gradient checkpointing (False, True, a
        level count or (level, kind) pairs: `memory.checkpointed_layers`); restored after."""
