import math

import pytest
import torch

from i2vedit_core.schedule import (denoising_sigmas, edm_v_preconditioning, euler_step, extrapolated_sigma0,
                                   inversion_sigmas, karras_sigmas)

# OFFICIAL_CODE_NOTES section 3: the 25 sigmas of the official scheduler.
OFFICIAL_SIGMAS = [700, 545.73, 421.57, 322.45, 244.02, 182.55, 134.85, 98.267, 70.541, 49.810, 34.537, 23.468,
                   15.590, 10.097, 6.3543, 3.8697, 2.2691, 1.2732, 0.67815, 0.33938, 0.15740, 0.06640, 0.02480,
                   0.00788, 0.002]


def test_karras_sigmas_match_official_schedule():
    sigmas = karras_sigmas(25)
    assert len(sigmas) == 25
    # The notes print 4-5 significant digits: compare to half a unit of the last printed digit.
    for ours, printed in zip(sigmas.tolist(), OFFICIAL_SIGMAS):
        digits = len(repr(float(printed)).split("e")[0].replace(".", "").lstrip("0")) or 1
        assert ours == pytest.approx(printed, rel=5 * 10 ** -digits), (ours, printed)


def test_karras_sigmas_match_diffusers_svd_scheduler():
    from diffusers import EulerDiscreteScheduler
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       prediction_type="v_prediction", sigma_max=700.0, sigma_min=0.002,
                                       steps_offset=1, timestep_spacing="leading", timestep_type="continuous",
                                       use_karras_sigmas=True, interpolation_type="linear")
    scheduler.set_timesteps(25)
    assert torch.allclose(denoising_sigmas(25).float(), scheduler.sigmas.float(), rtol=1e-4, atol=0)


def test_denoising_sigmas_end_at_zero():
    sigmas = denoising_sigmas(25)
    assert len(sigmas) == 26 and sigmas[-1] == 0 and float(sigmas[0]) == pytest.approx(700, rel=1e-12)


def test_inversion_sigmas_start_with_extrapolated_sigma0():
    sigmas = inversion_sigmas(25)
    assert len(sigmas) == 26
    assert sigmas[0] == pytest.approx(5.07e-4, rel=2e-3)
    assert sigmas[0] == pytest.approx(0.002 ** 2 / float(karras_sigmas(25)[-2]), rel=1e-12)
    assert bool((sigmas[1:] > sigmas[:-1]).all())
    assert torch.equal(sigmas[1:], karras_sigmas(25).flip(0))
    assert extrapolated_sigma0(torch.tensor([4.0, 2.0, 1.0])) == 0.5


@pytest.mark.parametrize("sigma", [5.07e-4, 0.002, 1.0, 10.0, 700.0])
def test_v_preconditioning_formulas(sigma):
    p = edm_v_preconditioning(sigma)
    assert p.c_in == pytest.approx(1 / math.sqrt(sigma ** 2 + 1))
    assert p.c_skip == pytest.approx(1 / (sigma ** 2 + 1))
    assert p.c_out == pytest.approx(-sigma / math.sqrt(sigma ** 2 + 1))
    assert p.c_noise == pytest.approx(0.25 * math.log(sigma))
    # EDM with sigma_data = 1: c_skip + c_out^2 = 1 (unit-variance training target).
    assert p.c_skip + p.c_out ** 2 == pytest.approx(1.0, rel=1e-12)


def test_v_preconditioning_rejects_zero_sigma():
    with pytest.raises(ValueError, match="sigma must be > 0"):
        edm_v_preconditioning(0.0)


def test_euler_step_is_linear_ode_step():
    x = torch.tensor([3.0]); denoised = torch.tensor([1.0])
    # derivative (3 - 1) / 2 = 1, step of +3 -> 6
    assert torch.equal(euler_step(x, denoised, 2.0, 5.0), torch.tensor([6.0]))
    # stepping to sigma 0 lands exactly on the denoised estimate
    assert torch.allclose(euler_step(x, denoised, 2.0, 0.0), denoised)
