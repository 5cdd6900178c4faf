import pytest
import torch

from i2vedit_core.inversion import InversionSettings, invert_clip, invert_clips
from i2vedit_core.sampling import denoise, invert
from i2vedit_core.schedule import denoising_sigmas, inversion_sigmas


def test_perfect_denoiser_inverts_and_reconstructs_exactly():
    # For a denoiser that knows the clean sample, the ODE path is the straight line x0 + sigma * eps,
    # so Euler is exact both ways: any sign or index error in either loop shows up here.
    x0 = torch.randn(1, 3, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    perfect = lambda x, sigma, step: x0
    up = inversion_sigmas(25)
    trajectory = invert(perfect, x0, up)
    assert trajectory.shape == (26, *x0.shape) and trajectory.dtype == torch.float32
    assert torch.equal(trajectory[0], x0)
    assert torch.allclose(trajectory[-1], x0, atol=1e-4)  # x - D stays 0: the path never leaves x0
    noisy = x0 + 700.0 * torch.ones_like(x0)
    out = denoise(perfect, noisy, denoising_sigmas(25))
    assert torch.allclose(out, x0, atol=1e-5)


def test_invert_then_denoise_reconstructs_source_latent(backend, clip):
    """ALGORITHM invariant 1 on the tiny SVD: error falls as steps rise (first order, like Euler).

    A random-weight UNet's D is far from a trained model's (its ODE paths are not straight), so the
    absolute error at 25 steps is not small here; exactness is shown with the perfect denoiser above.
    """
    errors = []
    for steps in (5, 10, 25, 50):
        inversion = invert_clip(backend, clip, InversionSettings(steps=steps))
        out = denoise(lambda x, s, step: backend.denoise(x, s, inversion.cond), inversion.noise,
                      denoising_sigmas(steps))
        errors.append(float((out - inversion.latents[0]).pow(2).mean().sqrt()))
    assert errors == sorted(errors, reverse=True), errors
    assert errors[-1] < 0.7 * errors[-2], errors  # 25 -> 50 steps: close to halving
    assert errors[-1] < 0.4 * errors[0], errors


def test_inversion_shapes_dtype_and_callback(backend, clip):
    calls = []
    inversion = invert_clip(backend, clip, InversionSettings(steps=4), callback=calls.append)
    assert inversion.latents.shape == (5, 1, 6, 4, 8, 8)
    assert inversion.latents.dtype == torch.float32
    assert [c["i"] for c in calls] == [0, 1, 2, 3]
    assert calls[-1]["sigma_next"] == pytest.approx(700.0)
    assert torch.equal(inversion.latent_at(700.0), inversion.noise)
    assert torch.equal(inversion.latent_at(inversion.sigmas[0] * 1.01), inversion.latents[0])


def test_inversion_is_seeded(backend, clip):
    a = invert_clip(backend, clip, InversionSettings(steps=2, seed=1))
    b = invert_clip(backend, clip, InversionSettings(steps=2, seed=1))
    c = invert_clip(backend, clip, InversionSettings(steps=2, seed=2))
    assert torch.equal(a.latents, b.latents)
    assert not torch.equal(a.latents, c.latents)


def test_callback_raising_cancels_the_loop():
    class Cancelled(Exception):
        pass

    def cancel_at_step_2(info):
        if info["i"] == 2:
            raise Cancelled

    evaluations = []
    model = lambda x, sigma, step: evaluations.append(step) or x * 0
    with pytest.raises(Cancelled):
        denoise(model, torch.ones(1, 2), denoising_sigmas(10), callback=cancel_at_step_2)
    assert evaluations == [0, 1, 2]


def test_samplers_reject_wrong_sigma_order():
    model = lambda x, sigma, step: x
    with pytest.raises(ValueError, match="ascending"):
        invert(model, torch.zeros(1), denoising_sigmas(5))
    with pytest.raises(ValueError, match="descending"):
        denoise(model, torch.zeros(1), inversion_sigmas(5))


def test_empty_clip_list_is_a_clear_error(backend):
    with pytest.raises(ValueError, match="no clips"):
        invert_clips(backend, [])


def test_clip_of_one_frame_is_a_clear_error(backend, clip):
    with pytest.raises(ValueError, match="at least 2 frames"):
        invert_clip(backend, clip[:1])
