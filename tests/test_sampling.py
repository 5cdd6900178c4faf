import pytest
import torch

from i2vedit_core.inversion import InversionSettings, invert_clip, invert_clips
from i2vedit_core.sampling import denoise, invert
from i2vedit_core.schedule import denoising_sigmas, euler_step, inversion_sigmas, karras_sigmas

# Gaussian data x0 ~ N(0, S^2) has the exact denoiser D(x, sigma) = x S^2 / (sigma^2 + S^2), so the
# probability-flow ODE dx/dsigma = (x - D) / sigma = x sigma / (sigma^2 + S^2) has the closed-form solution
# x(sigma) = x(sigma_a) sqrt((sigma^2 + S^2) / (sigma_a^2 + S^2)), and one Euler step multiplies x by
# 1 + (sigma_next - sigma) sigma / (sigma^2 + S^2). The tests below pin both: a flipped sign, a wrong divisor
# or a doubled step in euler_step changes every number here.
S = 0.5


def gaussian_denoiser(x, sigma, step=None):
    return x * (S * S / (float(sigma) ** 2 + S * S))


def exact_flow(x_start, sigma_start, sigma):
    return x_start * ((sigma ** 2 + S * S) / (sigma_start ** 2 + S * S)) ** 0.5


def euler_factor(sigma, sigma_next):
    return 1 + (sigma_next - sigma) * sigma / (sigma * sigma + S * S)


def test_one_euler_step_of_the_gaussian_ode_is_the_closed_form_factor():
    x = torch.tensor([1.0, -2.0, 0.25], dtype=torch.float64)
    for sigma, sigma_next in ((0.4, 0.9), (2.0, 1.0), (0.5, 0.1)):  # up (inversion) and down (sampling)
        stepped = euler_step(x, gaussian_denoiser(x, sigma), sigma, sigma_next)
        torch.testing.assert_close(stepped, x * euler_factor(sigma, sigma_next), rtol=1e-12, atol=0)
    # 0.5 -> 0.1 by hand: derivative x * 0.5 / 0.5 = x, step -0.4: x * 0.6
    torch.testing.assert_close(euler_step(x, gaussian_denoiser(x, 0.5), 0.5, 0.1), 0.6 * x, rtol=1e-12, atol=0)


def test_inversion_trajectory_follows_euler_and_converges_to_the_ode_at_first_order():
    x0 = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0)) * S
    errors = []
    for steps in (8, 16, 32, 64):
        sigmas = torch.linspace(0.05, 4.0, steps + 1, dtype=torch.float64)
        trajectory = invert(gaussian_denoiser, x0, sigmas)
        factors = [euler_factor(float(a), float(b)) for a, b in zip(sigmas[:-1], sigmas[1:])]
        expected = torch.stack([x0 * torch.tensor(factors[:k], dtype=torch.float64).prod().item()
                                for k in range(steps + 1)])
        torch.testing.assert_close(trajectory, expected, rtol=2e-6, atol=1e-7)  # every intermediate value
        exact = torch.stack([exact_flow(x0, 0.05, float(sigma)) for sigma in sigmas])
        errors.append(float((trajectory - exact).abs().max() / x0.abs().max()))
    assert errors[0] > 1e-3, errors  # the test sees the discretisation error at all
    ratios = [b / a for a, b in zip(errors, errors[1:])]
    assert all(0.4 < r < 0.6 for r in ratios), (errors, ratios)  # first order: halving h halves the error


def test_denoising_the_gaussian_ode_matches_the_exact_solution_at_first_order():
    x_max = torch.randn(3, 5, generator=torch.Generator().manual_seed(1)) * (10.0 ** 2 + S * S) ** 0.5
    seen, errors = [], []
    for steps in (10, 20, 40, 80):
        sigmas = torch.cat([karras_sigmas(steps, sigma_min=0.01, sigma_max=10.0), torch.zeros(1, dtype=torch.float64)])
        out = denoise(gaussian_denoiser, x_max, sigmas, callback=seen.append)
        # intermediate: the latent after step 0 is x_max times the first Euler factor
        first = seen[-steps]["x"]
        torch.testing.assert_close(first, x_max * euler_factor(float(sigmas[0]), float(sigmas[1])), rtol=1e-6, atol=0)
        errors.append(float((out - exact_flow(x_max, 10.0, 0.0)).abs().max() / x_max.abs().max()))
    assert errors[0] > 1e-3, errors
    ratios = [b / a for a, b in zip(errors, errors[1:])]
    assert all(0.35 < r < 0.65 for r in ratios), (errors, ratios)


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


def test_a_float64_model_keeps_latents_and_conditioning_in_float64(clip):
    """The parity harness compares float64 runs: a float32 state would round every step to 6e-8, which the
    random tiny model's inversion amplifies to 3e-3 by sigma_max (docs/FIDELITY.md)."""
    from i2vedit_core.tiny import tiny_backend
    backend = tiny_backend(seed=0)
    for module in (backend.unet, backend.vae, backend.image_encoder):
        module.double()
    backend.dtype = torch.float64
    settings = InversionSettings(steps=2, cond_8bit=True, vae_sample=True)
    inversion = invert_clip(backend, clip[:3], settings)
    assert inversion.latents.dtype == torch.float64
    assert inversion.cond.image_latents.dtype == inversion.cond.image_embeds.dtype == torch.float64
    plain = invert_clip(backend, clip[:3], InversionSettings(steps=2))
    assert plain.latents.dtype == plain.cond.image_latents.dtype == torch.float64
    assert 0 < float((plain.latents[-1] - inversion.latents[-1]).abs().max())


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
