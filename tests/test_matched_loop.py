"""The one matched loop (sampling.sample_matched) and the schedule check the ComfyUI Matched Sampler uses."""

import pytest
import torch

from i2vedit_core.editing import check_schedule, edit_sigmas
from i2vedit_core.inversion import Inversion
from i2vedit_core.sampling import sample_matched
from i2vedit_core.schedule import denoising_sigmas, euler_step, inversion_sigmas


def test_hook_runs_before_each_model_call_and_the_mask_holds_the_source():
    sigmas = denoising_sigmas(3)
    events = []
    source = [torch.full((1, 2, 2), float(10 + i)) for i in range(4)]  # source(i): a distinct latent per step
    keep = torch.tensor([[1.0, 0.0], [1.0, 0.0]])

    def model(x, sigma):
        events.append(("model", float(sigma), x.clone()))
        return x * 0.5

    out = sample_matched(model, torch.ones(1, 2, 2), sigmas, keep=keep, source=lambda i: source[i],
                         before_step=lambda i, sigma: events.append(("hook", i, sigma)))
    assert [e[0] for e in events] == ["hook", "model"] * 3
    assert [e[1] for e in events if e[0] == "hook"] == [0, 1, 2]
    for i in range(3):  # the model sees the source's step-i latent where keep = 0
        assert torch.equal(events[2 * i + 1][2][..., 1], source[i][..., 1])
    assert torch.equal(out[..., 1], source[3][..., 1])  # and the output the clean source there
    x = torch.ones(1, 2, 2)  # where keep = 1: plain Euler
    for i in range(3):
        x = euler_step(x, x * 0.5, float(sigmas[i]), float(sigmas[i + 1])) if sigmas[i + 1] > 0 else x * 0.5
    torch.testing.assert_close(out[..., 0], x[..., 0], rtol=1e-6, atol=0)


def test_mask_needs_the_source_trajectory():
    with pytest.raises(ValueError, match="source trajectory"):
        sample_matched(lambda x, s: x, torch.ones(1), denoising_sigmas(2), keep=torch.ones(1))


def test_the_host_schedule_must_be_the_inversions():
    inversion = Inversion(inversion_sigmas(4), torch.zeros(5, 1), None)
    karras32 = denoising_sigmas(4).float()  # what ComfyUI's KarrasScheduler gives, in float32
    assert torch.equal(check_schedule(inversion, karras32), edit_sigmas(inversion))
    for wrong in (denoising_sigmas(5), denoising_sigmas(4, sigma_max=80.0), denoising_sigmas(4).flip(0)):
        with pytest.raises(ValueError, match="KarrasScheduler with the inversion's steps \\(4\\)"):
            check_schedule(inversion, wrong)
