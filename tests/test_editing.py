"""Matched denoising of one clip on the tiny SVD: ALGORITHM invariants 2, 3 and 5, and the plumbing."""

import pytest
import torch

from i2vedit_core.attention import AttentionController, MatchSettings, TemporalSelector
from i2vedit_core.conditioning import MicroConditioning, frame_conditioning
from i2vedit_core.editing import Clip0, EditSettings, edit_clip
from i2vedit_core.inversion import InversionSettings, invert_clip
from i2vedit_core.sampling import denoise
from i2vedit_core.skip import KVSource, SkipInterval
from i2vedit_core.tiny import synthetic_clip

STEPS = 5


@pytest.fixture(scope="module")
def inversion(backend, clip):
    return invert_clip(backend, clip[:4], InversionSettings(steps=STEPS))


def test_identity_edit_copies_the_source(backend, inversion):
    """Invariant 2: source conditioning as the edit, guidance 1, no latent noise, beta1 = 1."""
    settings = EditSettings(MatchSettings(temporal=TemporalSelector(1.0, 1.0)), max_guidance=1.0,
                            cond_latent_noise=0.0)
    log = []
    result = edit_clip(backend, inversion, inversion.cond, settings, lora_scale=0.0, callback=log.append)
    assert len(log) == STEPS and len(log[0]["masks"]) == 16
    # d == 0 up to round-off: exact along the down path; batch-1 vs CFG batch-2 convolutions differ by
    # ~5e-5 relative in the plain model too, and the 2x2-token up layers amplify that.
    first = log[0]["masks"]
    assert max(float(m.max()) for p, m in first.items() if p.startswith("down_blocks")) < 1e-5
    assert max(float(m.max()) for m in first.values()) < 1e-3
    mean_d = [float(torch.stack([m.mean() for m in e["masks"].values()]).mean()) for e in log]
    # Small while the latents still follow the inversion path; a random-weight UNet's denoising leaves
    # that path at low sigma (see test_sampling: its reconstruction error is not small), so d grows there.
    assert max(mean_d[:3]) < 0.01, mean_d
    assert all(len(e["temporal_source"]) == 16 for e in log)  # beta1 = 1: source probabilities everywhere
    plain = denoise(lambda x, s, step: backend.denoise(x, s, inversion.cond), inversion.noise, result.sigmas)
    error = float((result.latent - inversion.latents[0]).pow(2).mean().sqrt())
    plain_error = float((plain - inversion.latents[0]).pow(2).mean().sqrt())
    assert error < 1.05 * plain_error, (error, plain_error)  # reconstructs as well as the unmatched model
    assert result.latent.shape == inversion.latents[0].shape
    assert result.latents.shape == (STEPS, *inversion.latents[0].shape)
    avg = result.maps.average()
    assert avg.shape == (1, 4, 8, 8) and float(avg.max()) <= 1.0


def test_local_patch_edit_gives_larger_difference_near_the_patch(backend):
    """Invariant 3: first step, highest-resolution spatial layers."""
    clip = synthetic_clip(num_frames=2, height=128, width=128, seed=0)
    micro = MicroConditioning(fps_id=8, noise_aug_strength=0.0)
    inversion = invert_clip(backend, clip, InversionSettings(steps=2, micro=micro))
    edited = clip[0].clone()
    edited[:, 80:112, 80:112] = torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1)  # latent rows/cols 10..13
    cond = frame_conditioning(backend, edited, 2, micro, torch.Generator().manual_seed(0))
    log = []
    edit_clip(backend, inversion, cond, EditSettings(cond_latent_noise=0.0), lora_scale=0.0, callback=log.append)
    top = [m[0].view(2, 16, 16) for p, m in log[0]["masks"].items() if p.startswith("down_blocks.0")]
    assert len(top) == 2
    near = torch.stack([m[:, 10:14, 10:14].mean() for m in top]).mean()
    far = torch.stack([m[:, :6, :6].mean() for m in top]).mean()
    assert float(near) > 1.4 * float(far), (float(near), float(far))


def test_source_step_offset_matches_the_official_sigma(backend, inversion, monkeypatch):
    seen = []
    original = backend.denoise

    def spy(x, sigma, cond, attention=None, lora_scale=1.0):
        if lora_scale == 0.0 and attention is not None and attention.capture_source:
            seen.append(sigma)
        return original(x, sigma, cond, attention, lora_scale)

    monkeypatch.setattr(backend, "denoise", spy)
    for offset in (0, 1):
        seen.clear()
        result = edit_clip(backend, inversion, inversion.cond, EditSettings(source_step_offset=offset))
        expected = inversion.sigmas.flip(0)[offset:offset + STEPS]
        torch.testing.assert_close(torch.tensor(seen, dtype=torch.float64), expected)
        assert torch.isfinite(result.latent).all()
    with pytest.raises(ValueError, match="official"):
        EditSettings(source_step_offset=2)


def test_skip_interval_doubles_temporal_keys_end_to_end(backend, inversion, monkeypatch):
    """Invariant 5: clip 0 == clip k; inversion, training-style denoise and editing all run with 2F keys."""
    keys = []
    attend = AttentionController.attend

    def spy(self, q, k, v, site, p):
        out = attend(self, q, k, v, site, p)
        if site.kind == "temporal" and p.concat_kv:
            keys.append((site.layout.frames, self.buffer.clip0_kv[site.path]))
        return out

    monkeypatch.setattr(AttentionController, "attend", spy)
    frames = inversion.latents.shape[2]
    edit0 = edit_clip(backend, inversion, inversion.cond, EditSettings(), lora_scale=0.0)
    assert not keys  # clip 0 itself concatenates nothing
    edit1 = edit_clip(backend, inversion, inversion.cond, EditSettings(), lora_scale=0.0,
                      clip0=Clip0.of(inversion, edit0))
    assert len(keys) == STEPS * 16 * 2  # source and edit forwards, every temporal layer, every step
    assert all(next(iter(kv.values()))[0].shape[2] == frames == f for f, kv in keys)
    assert torch.isfinite(edit1.latent).all() and not torch.allclose(edit1.latent, edit0.latent, atol=1e-4)
    # Training-style denoise: the mechanism, not a numeric effect (on a random tiny UNet the clip-0 keys
    # can move D by less than float noise). Every temporal layer gets [clip-0 K/V ; own K/V] along the
    # frame axis: 2F keys, the first F exactly those of a base-model forward on clip 0's inversion latent.
    concatenated, captured = [], {}
    with_clip0 = AttentionController._with_clip0_kv

    def spy_concat(self, k, v, site):
        k2, v2 = with_clip0(self, k, v, site)
        kept = next(iter(self.buffer.clip0_kv[site.path].values()))
        concatenated.append((site.path, k, v, k2, v2, kept))
        return k2, v2

    monkeypatch.setattr(AttentionController, "_with_clip0_kv", spy_concat)
    sigma = float(inversion.sigmas[2])
    skip = SkipInterval(backend, KVSource.from_inversion(inversion))
    x = inversion.latents[2] + 0.1 * torch.randn(inversion.latents[2].shape, generator=torch.Generator().manual_seed(3))
    d = skip.denoise(x, sigma, inversion.cond, lora_scale=0.0)
    assert torch.isfinite(d).all() and len({path for path, *_ in concatenated}) == 16 == len(concatenated)
    for path, k, v, k2, v2, (k0, v0) in concatenated:
        assert k.shape[2] == frames and k2.shape[2] == v2.shape[2] == 2 * frames, path
        assert torch.equal(k2[:, :, :frames], k0.to(k.dtype)) and torch.equal(k2[:, :, frames:], k)
        assert torch.equal(v2[:, :, :frames], v0.to(v.dtype)) and torch.equal(v2[:, :, frames:], v)
        assert not torch.allclose(k0, k)  # clip 0's keys, not a copy of the clip's own
    # ...and the kept clip-0 K/V are those of a base-model forward on clip 0's latent at this sigma
    reference = AttentionController(skip.controller.settings, skip_interval=True)
    reference.begin_step(0)
    backend.denoise(inversion.latent_at(sigma), sigma, inversion.cond, attention=reference.kv_pass(("source",)),
                    lora_scale=0.0)
    for path, *_, (k0, v0) in concatenated:
        torch.testing.assert_close(k0, reference.buffer.clip0_kv[path]["source"][0], rtol=0, atol=0)
    reference.end()
    assert not skip.controller.buffer.clip0_kv  # nothing kept after the call


def test_skip_interval_inversion_runs_and_differs(backend, clip, inversion):
    again = invert_clip(backend, clip[:4], InversionSettings(steps=STEPS), clip0=inversion)
    assert again.latents.shape == inversion.latents.shape and torch.isfinite(again.latents).all()
    assert not torch.allclose(again.noise, inversion.noise, atol=1e-4)
    torch.testing.assert_close(again.latents[0], inversion.latents[0])  # same clean start


def test_bad_edit_conditioning_is_refused(backend, inversion):
    two = type(inversion.cond).cat(inversion.cond, inversion.cond)
    with pytest.raises(ValueError, match="one video"):
        edit_clip(backend, inversion, two)
