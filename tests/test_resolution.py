import pytest
import torch

from i2vedit_core.resolution import from_working, plan_fit, to_working


@pytest.mark.parametrize("source,mode,working", [
    ((576, 1024), "resize", (576, 1024)),
    ((1080, 1920), "resize", (576, 1024)),
    ((720, 720), "resize", (768, 768)),
    ((1920, 1080), "resize", (1024, 576)),  # portrait stays portrait
    ((480, 640), "pad", (576, 1024)),
    ((100, 130), "resize", (704, 896)),
])
def test_working_size_is_valid_and_aspect_is_kept(source, mode, working):
    fit = plan_fit(source, (576, 1024), mode)
    assert fit.working_hw == working
    assert all(s % 64 == 0 for s in fit.working_hw)
    top, left, ch, cw = fit.content_box
    assert abs(ch / cw - source[0] / source[1]) < 0.02 * source[0] / source[1]  # never stretched
    assert 0 <= top and 0 <= left and top + ch <= working[0] and left + cw <= working[1]


def test_round_trip_restores_size_and_content():
    frames = torch.rand(2, 3, 90, 160) * 2 - 1
    frames = torch.nn.functional.avg_pool2d(frames, 5, 1, 2)  # smooth, so resampling is near lossless
    fit = plan_fit((90, 160), (576, 1024), "pad")
    working = to_working(frames, fit)
    assert working.shape == (2, 3, 576, 1024)
    back = from_working(working, fit)
    assert back.shape == frames.shape
    assert (back - frames).abs().mean() < 0.02


def test_identity_when_already_at_working_size():
    frames = torch.rand(1, 3, 128, 192) * 2 - 1
    fit = plan_fit((128, 192), (128, 192), "pad")
    assert torch.equal(to_working(frames, fit), frames) and torch.equal(from_working(frames, fit), frames)


@pytest.mark.parametrize("args,match", [(((10, 10), (576, 1000), "pad"), "multiples of 64"),
                                        (((10, 10), (576, 1024), "stretch"), "fit mode"),
                                        (((0, 10), (576, 1024), "pad"), "positive")])
def test_bad_fit_settings(args, match):
    with pytest.raises(ValueError, match=match):
        plan_fit(*args)
