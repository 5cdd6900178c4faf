import pytest
import torch
import torch.nn.functional as F

from i2vedit_core.sarp import gradient_magnitude, perturb_smooth_areas, smooth_area_mask


def naive_sarp(frames, alpha, threshold, noise):
    """ALGORITHM section 2 written out literally, with explicit zero-padded Sobel loops."""
    kx = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]])
    ky = kx.t()
    h, w = frames.shape[-2:]
    padded = F.pad(frames, (1, 1, 1, 1))
    gx = sum(kx[dy, dx] * padded[:, :, dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3))
    gy = sum(ky[dy, dx] * padded[:, :, dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3))
    magnitude = (gx.abs() + gy.abs()).mean(1, keepdim=True)
    mask = (magnitude <= threshold).float()
    return (frames + alpha * noise * mask).clamp(-1, 1)


def test_matches_naive_reference(clip):
    gen = torch.Generator().manual_seed(3)
    ours = perturb_smooth_areas(clip, 0.005, 0.001, gen)
    noise = torch.randn(clip.shape, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(ours, naive_sarp(clip, 0.005, 0.001, noise), atol=1e-7)


def test_only_pixels_with_constant_neighbourhood_change(clip):
    out = perturb_smooth_areas(clip, 0.05, 0.001, torch.Generator().manual_seed(0))
    changed = (out != clip).any(dim=1, keepdim=True)
    padded = F.pad(clip, (1, 1, 1, 1), value=0.0)
    windows = F.unfold(padded, 3).view(clip.shape[0], 3, 9, *clip.shape[-2:])
    constant = (windows == windows[:, :, 4:5]).all(dim=2).all(dim=1, keepdim=True)
    assert changed.any(), "the flat background and bar must be perturbed"
    assert not (changed & ~constant).any(), "a pixel with a non-constant 3x3 neighbourhood changed"


def test_border_pixels_are_smooth_only_at_zero():
    frames = torch.full((1, 3, 8, 8), 0.4)
    mask = smooth_area_mask(frames)
    assert mask[0, 0, 1:-1, 1:-1].all() and not mask[0, 0, 0].any()
    assert smooth_area_mask(torch.zeros(1, 3, 8, 8)).all()


def test_alpha_zero_is_identity(clip):
    assert torch.equal(perturb_smooth_areas(clip, 0.0, 0.001, torch.Generator().manual_seed(0)), clip)


def test_seeded(clip):
    a = perturb_smooth_areas(clip, 0.005, 0.001, torch.Generator().manual_seed(7))
    b = perturb_smooth_areas(clip, 0.005, 0.001, torch.Generator().manual_seed(7))
    c = perturb_smooth_areas(clip, 0.005, 0.001, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_output_stays_in_range():
    frames = torch.ones(1, 3, 8, 8)
    out = perturb_smooth_areas(frames, 1.0, 0.001, torch.Generator().manual_seed(0))
    assert out.max() <= 1 and out.min() >= -1 and not torch.equal(out, frames)


def test_gradient_is_l1_sobel_averaged_over_channels():
    frames = torch.zeros(1, 3, 5, 5)
    frames[0, 0, :, 3:] = 1.0  # a vertical step in the red channel only
    g = gradient_magnitude(frames)
    # at the step, Sobel_x = 1 + 2 + 1 = 4 in red, 0 elsewhere -> mean over 3 channels = 4/3
    assert g[0, 0, 2, 2] == pytest.approx(4 / 3)
    assert g[0, 0, 2, 0] == 0
