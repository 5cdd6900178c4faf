"""Skip-interval cross-attention (ALGORITHM §6): clip-0 temporal K/V recomputed, never stored.

For a clip k >= 1, every temporal attn1 attends over [clip-0 frames ; own frames]. The clip-0 K/V
of a step come from extra forwards on stored clip-0 latents (a K/V source: `KVSource` here for
source clip 0, `editing.EditedClip0` for the edited clip 0); the forward that needs them runs right
after, in the same controller step. It sits above the backend seam (it drives model forwards),
next to inversion and editing; attention/ holds the host-free maths.

Training / inversion of clip k (base-model K/V of the *source* clip 0 at the nearest sigma):

    skip = SkipInterval(backend, KVSource.from_inversion(clip0_inversion))
    denoised = skip.denoise(x, sigma, cond, lora_scale=1.0)   # differentiable w.r.t. the LoRA

Editing uses the same pieces through `editing.edit_clip(..., clip0=...)`.
"""

from dataclasses import dataclass
from typing import Callable, Tuple

import torch

from .attention.controller import AttentionController, MatchSettings
from .backends.base import Conditioning, SVDBackend, state_float


@dataclass(frozen=True)
class KVSource:
    """Clip 0 as a source of K/V: its latent at a sigma (1, F0, 4, h, w), its conditioning (one row per
    role in `rows`), and the LoRA scale of the forward (0 = base model)."""
    latent_at: Callable[[float], torch.Tensor]
    cond: Conditioning
    rows: Tuple[str, ...] = ("source",)
    lora_scale: float = 0.0

    def __post_init__(self):
        if self.cond.batch_size != len(self.rows):
            raise ValueError(f"clip-0 conditioning has {self.cond.batch_size} rows for roles {self.rows}")

    @staticmethod
    def from_inversion(inversion) -> "KVSource":
        """Source clip 0: its inversion latent nearest each sigma, base model, source conditioning."""
        return KVSource(inversion.latent_at, inversion.cond)

    def capture(self, backend: SVDBackend, controller: AttentionController, sigma: float, step: int = 0) -> None:
        capture_clip0_kv(backend, controller, self, sigma)


def capture_clip0_kv(backend: SVDBackend, controller: AttentionController, source: KVSource,
                     sigma: float) -> None:
    """Fill the controller's step buffer with clip-0 K/V of every temporal attn1 (the output is discarded)."""
    x = state_float(source.latent_at(sigma))
    with torch.no_grad():
        backend.denoise(x.expand(len(source.rows), *x.shape[1:]), sigma, source.cond,
                        attention=controller.kv_pass(source.rows), lora_scale=source.lora_scale)


class SkipInterval:
    """A denoiser D(x, sigma | cond) whose temporal attention also sees clip 0 (training, inversion)."""

    def __init__(self, backend: SVDBackend, source: KVSource):
        self.backend, self.source = backend, source
        self.controller = AttentionController(MatchSettings(), skip_interval=True)

    def denoise(self, x: torch.Tensor, sigma: float, cond: Conditioning, lora_scale: float = 1.0,
                rows: Tuple[str, ...] = ("cond",)) -> torch.Tensor:
        """rows: roles of the batch videos; a single kept clip-0 role serves any of them."""
        self.controller.begin_step(0)
        capture_clip0_kv(self.backend, self.controller, self.source, sigma)
        try:
            out = self.backend.denoise(x, sigma, cond, attention=self.controller.plain_pass(rows),
                                       lora_scale=lora_scale)
        except BaseException:
            self.controller.end()
            raise
        # An output with a graph keeps the clip-0 K/V until the next call replaces them: with gradient
        # checkpointing, backward re-runs the temporal attention and needs them again.
        if not out.requires_grad:
            self.controller.end()
        return out
