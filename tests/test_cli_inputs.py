"""Images read right (issue 11): 16-bit scaled, EXIF orientation, grey/palette, alpha and masks as documented."""

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from i2vedit_core.video_io import read_image, read_mask


def save(path, array, mode=None, **kwargs):
    Image.fromarray(array, mode).save(path, **kwargs)
    return path


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_grey_is_scaled_not_saturated(tmp_path, suffix):
    grey = np.array([[0, 16384, 32768, 65535]], np.uint16).repeat(2, 0)
    image = read_image(save(tmp_path / f"g16{suffix}", grey))
    assert image.shape == (3, 2, 4)
    expected = torch.tensor([0, 16384, 32768, 65535]) / 65535 * 2 - 1
    assert torch.allclose(image[0, 0], expected, atol=1e-6) and torch.equal(image[0], image[2])


def test_8_bit_grey_and_palette_become_rgb(tmp_path):
    grey = read_image(save(tmp_path / "l.png", np.full((3, 5), 51, np.uint8)))
    assert grey.shape == (3, 3, 5) and torch.allclose(grey, torch.full_like(grey, 51 / 127.5 - 1))
    palette = Image.fromarray(np.full((3, 5, 3), (255, 0, 0), np.uint8)).convert("P")
    palette.save(tmp_path / "p.png")
    red = read_image(tmp_path / "p.png")
    assert torch.allclose(red[:, 0, 0], torch.tensor([1.0, -1.0, -1.0]))


def test_exif_orientation_is_applied(tmp_path):
    array = np.zeros((4, 6, 3), np.uint8)
    array[0, 0] = 255  # a white top-left pixel, stored landscape
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(array).save(tmp_path / "o.png", exif=exif)
    shown = read_image(tmp_path / "o.png")
    assert shown.shape == (3, 6, 4)  # displayed portrait
    assert float(shown[0, 0, -1]) == 1.0 and float(shown[0, 0, 0]) == -1.0  # top-left went to the top-right


def test_opaque_alpha_is_dropped_transparent_alpha_refused(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    opaque = read_image(save(tmp_path / "opaque.png", rgba, "RGBA"))
    assert torch.allclose(opaque[0], torch.full((4, 4), 200 / 127.5 - 1))
    rgba[0, 0, 3] = 254
    with pytest.raises(ValueError, match="transparent pixels: flatten it onto a background first"):
        read_image(save(tmp_path / "hole.png", rgba, "RGBA"))


def test_mask_is_luminance_against_the_threshold(tmp_path):
    values = np.array([[0, 100, 127, 128, 200, 255]], np.uint8)
    path = save(tmp_path / "m.png", values)
    assert read_mask(path).tolist() == [[0, 0, 0, 1, 1, 1]]  # 128/255 >= 0.5
    assert read_mask(path, threshold=0.45).tolist() == [[0, 0, 1, 1, 1, 1]]
    green = np.zeros((1, 2, 3), np.uint8)
    green[0, 1] = (0, 255, 0)  # luminance 0.587
    assert read_mask(save(tmp_path / "g.png", green)).tolist() == [[0, 1]]
    sixteen = np.array([[30000, 40000]], np.uint16)  # 0.46, 0.61: a saturating reader would give [1, 1]
    assert read_mask(save(tmp_path / "m16.png", sixteen)).tolist() == [[0, 1]]


def test_reading_makes_no_numpy_warning(tmp_path):
    path = save(tmp_path / "rgb.png", np.zeros((4, 4, 3), np.uint8))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        read_image(path)
        read_mask(path)
    assert [str(w.message) for w in seen] == []
