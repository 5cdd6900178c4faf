"""Exact skip-interval (issue 12, ALGORITHM §6): the clip-0 K/V that clip 1's edit attends to are those of
edited clip 0 as its own edit made them (its LoRA at its scale, its matched attention, both CFG rows,
the same step), recomputed.

The reference is built the slow way, as the official code does with its store: run clip 0's edit,
keep its temporal K/V per step and layer in memory, feed them to clip 1. The recomputed path must match.
"""

from dataclasses import replace

import pytest
import torch

from i2vedit_core.attention.controller import CFG_ROWS, MatchSettings
from i2vedit_core.editing import Clip0, EditSettings, edit_clip
from i2vedit_core.inversion import InversionSettings, invert_clip
from i2vedit_core.lora import LoraSpec, motion_lora_from_pairs
from i2vedit_core.skip import KVSource
from i2vedit_core.tiny import synthetic_clip, tiny_backend

STEPS = 2
# Threshold 1: M = d, a continuous blend. At lower thresholds a rounding-level difference (another
# weight tensor, another GEMM blocking) can flip a mask element and move the result far past rounding.
MATCH = MatchSettings(thresholds=(1.0, 1.0))


def random_lora(backend, seed: int):
    from i2vedit_core.backends.diffusers_lora import module_shapes

    spec = LoraSpec(rank=2)
    gen = torch.Generator().manual_seed(seed)
    pairs = {path: (torch.randn(2, i, generator=gen) * 0.3, torch.randn(o, 2, generator=gen) * 0.3)
             for path, (o, i) in module_shapes(backend.unet, spec).items()}
    return motion_lora_from_pairs(pairs, spec)


class KeepingBackend:
    """Passes every call through; the edit forwards of clip 0 also keep their temporal K/V per step."""

    def __init__(self, backend):
        self.backend, self.kept = backend, {}

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def denoise(self, x, sigma, cond, attention=None, **kwargs):
        keep = attention is not None and attention.match and attention.rows == CFG_ROWS
        if keep:
            attention = replace(attention, capture_kv=True)
        out = self.backend.denoise(x, sigma, cond, attention=attention, **kwargs)
        if keep:
            self.kept[attention.controller.step] = dict(attention.controller.buffer.clip0_kv)
        return out


class StoredKV:
    """Edited clip 0's K/V read back from memory (the official code's store, without the disk)."""

    def __init__(self, kept):
        self.kept = kept

    def capture(self, backend, controller, sigma, step):
        controller.buffer.clip0_kv.update(self.kept[step])


def in_float64(backend):
    """The tiny model in float64: rounding (~1e-16) stays far below any real difference of K/V source."""
    for module in (backend.unet, backend.vae, backend.image_encoder):
        module.double()
    backend.dtype = torch.float64
    return backend


def load_float64(backend, lora, slot="clip"):
    backend.load_lora(lora, slot=slot)
    for name, module in backend.unet.named_modules():
        if ".lora_A." in name + "." or ".lora_B." in name + ".":
            module.double()


@pytest.fixture(scope="module")
def setup():
    backend = in_float64(tiny_backend(seed=0))
    video = synthetic_clip(num_frames=3, height=64, width=64, seed=3)
    settings = InversionSettings(steps=STEPS)
    inv0, inv1 = invert_clip(backend, video[:2], settings), invert_clip(backend, video[1:3], settings)
    edited = video[:1].flip(-1)  # a real edit: clip 0's matching masks are not trivial
    from i2vedit_core.conditioning import frame_conditioning
    cond0 = frame_conditioning(backend, edited[0], 2)
    cond1 = frame_conditioning(backend, video[1], 2)
    lora0, lora1 = random_lora(backend, 1), random_lora(backend, 2)
    return backend, inv0, inv1, cond0, cond1, lora0, lora1


def test_recomputed_clip0_kv_match_the_kept_ones(setup):
    backend, inv0, inv1, cond0, cond1, lora0, lora1 = setup
    settings = EditSettings(MATCH, source_step_offset=1)
    keeping = KeepingBackend(backend)
    load_float64(backend, lora0)
    edit0 = edit_clip(keeping, inv0, cond0, settings, lora_scale=0.8)
    assert sorted(keeping.kept) == list(range(STEPS)) and len(keeping.kept[0]) == 16
    assert set(next(iter(keeping.kept[0].values()))) == set(CFG_ROWS)  # both CFG rows, as the official code
    try:
        load_float64(backend, lora1)
        load_float64(backend, lora0, slot="clip0")
        slow = edit_clip(backend, inv1, cond1, settings, clip0=Clip0(KVSource.from_inversion(inv0),
                                                                    StoredKV(keeping.kept)))
        exact = edit_clip(backend, inv1, cond1, settings, clip0=Clip0.of(inv0, edit0))
        error = float((exact.latent - slow.latent).norm() / slow.latent.norm())
        assert error < 1e-9
        # The former approximation (edited clip-0 latents on the base model, no matching) is measurably off.
        approximate = Clip0(KVSource.from_inversion(inv0), KVSource(edit0.latent_at, edit0.cond, CFG_ROWS, 0.0))
        approx = edit_clip(backend, inv1, cond1, settings, clip0=approximate)
        assert float((approx.latent - slow.latent).norm() / slow.latent.norm()) > 1e-4
    finally:
        backend.detach_lora()


def test_clip0_lora_slot_is_per_call_and_detached_with_the_adapter(setup):
    backend, inv0, _, cond0, _, lora0, lora1 = setup
    x, sigma = inv0.latents[2], float(inv0.sigmas[2])
    try:
        backend.load_lora(lora0)
        with torch.no_grad():
            with_lora0 = backend.denoise(x, sigma, cond0)
            backend.load_lora(lora1)
            backend.load_lora(lora0, slot="clip0")
            # Rounding only: another weight tensor may take another GEMM blocking.
            torch.testing.assert_close(backend.denoise(x, sigma, cond0, lora_slot="clip0"), with_lora0,
                                       rtol=1e-5, atol=1e-5 * float(with_lora0.abs().max()))
            with_lora1 = backend.denoise(x, sigma, cond0)
            assert (with_lora1 - with_lora0).abs().max() > 1e-3  # the default slot is still clip 1's
            base = backend.denoise(x, sigma, cond0, lora_scale=0.0, lora_slot="clip0")
            backend.detach_lora()
            torch.testing.assert_close(backend.denoise(x, sigma, cond0), base, rtol=1e-5, atol=1e-5 * float(base.abs().max()))
            with pytest.raises(ValueError, match="slot='clip0'"):
                backend.denoise(x, sigma, cond0, lora_slot="clip0")
    finally:
        backend.detach_lora()
