import math
import sys

import pytest
import torch

from i2vedit_core import metrics
from i2vedit_core.tiny import synthetic_clip


@pytest.fixture(params=["with opencv", "without opencv"])
def opencv(request, monkeypatch):
    """Every warp-error test runs with OpenCV importable (skipped where it is not installed) and blocked."""
    if request.param == "with opencv":
        pytest.importorskip("cv2", reason="opencv-python-headless is not installed here")
        return True
    monkeypatch.setitem(sys.modules, "cv2", None)  # `import cv2` raises ImportError
    return False


def textured_video(num_frames=4, shift=2, size=64, seed=0):
    """A smooth random texture translated `shift` pixels right per frame (pure, known motion)."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.nn.functional.interpolate(torch.rand(1, 3, size // 4, size // 2, generator=gen),
                                           size=(size, 2 * size), mode="bicubic", align_corners=False)
    base = base.clamp(0, 1) * 2 - 1
    return torch.stack([base[0, :, :, size // 2 - t * shift: size // 2 - t * shift + size] for t in range(num_frames)])


def test_identical_frames_have_zero_flicker_and_warp_error(opencv):
    still = synthetic_clip(1).expand(4, -1, -1, -1).clone()
    assert metrics.flicker(still) == 0.0
    if opencv:
        assert metrics.warp_error(still) == pytest.approx(0.0, abs=1e-6)
    else:
        assert metrics.warp_error(still) is None


def test_shifted_copy_has_near_zero_warp_error_but_plain_difference(opencv):
    video = textured_video()
    plain_difference = float((metrics.to_unit(video[1:]) - metrics.to_unit(video[:-1])).abs().mean())
    warp = metrics.warp_error(video)
    assert plain_difference > 0.02
    if not opencv:
        assert warp is None and "pip install opencv-python-headless" in metrics.warp_error_unavailable()
        return
    assert warp < 0.2 * plain_difference, (warp, plain_difference)


def test_recoloured_region_drops_psnr_only_inside_it():
    source = synthetic_clip(3)
    edited = source.clone()
    edited[:, 0, 8:24, 8:24] = (edited[:, 0, 8:24, 8:24] + 0.5).clamp(-1, 1)
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 8:24, 8:24] = 1
    assert metrics.psnr(edited, source, 1 - mask) == math.inf
    assert metrics.psnr(edited, source, mask) < 20
    assert metrics.ssim(edited, source, 1 - mask) > metrics.ssim(edited, source, mask)
    found = metrics.edit_mask_from_first_frame(source[0], edited[0], grow=0)
    assert torch.equal(found, mask)


def test_flicker_sees_global_brightness_jumps():
    still = synthetic_clip(1).expand(4, -1, -1, -1).clone()
    flickering = still.clone()
    flickering[1::2] = (flickering[1::2] + 0.2).clamp(-1, 1)
    assert metrics.flicker(flickering) > 0.03


def test_seam_colour_drift_measures_the_jump_at_the_seam():
    video = synthetic_clip(6)
    drifted = video.clone()
    drifted[3:, 2] = (drifted[3:, 2] + 0.2).clamp(-1, 1)
    assert metrics.seam_colour_drift(video, [3]) < 0.02
    assert metrics.seam_colour_drift(drifted, [3]) > 0.05
    assert metrics.seam_colour_drift(drifted, []) == 0.0


def test_report_of_the_source_against_itself(opencv):
    source = synthetic_clip(4)
    report = metrics.video_report(source, source, edited_first=source[0], seams=[2])
    assert report["psnr_unedited"] == math.inf and report["first_frame_psnr"] == math.inf
    assert report["flicker"] == report["flicker_source"]
    if opencv:
        assert "not_computed" not in report
        assert report["warp_error"] == pytest.approx(report["warp_error_source"])
    else:  # the report names what it could not compute and why
        assert report["warp_error"] is None and report["warp_error_source"] is None
        assert set(report["not_computed"]) == {"warp_error", "warp_error_source"}
        assert "pip install opencv-python-headless" in report["not_computed"]["warp_error"]
