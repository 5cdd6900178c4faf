"""Weight-free quality metrics for an edited video (ECOSYSTEM_NOTES 5.3).

Frames are (T, 3, H, W) in [-1, 1]; values are reported on the [0, 1] scale. Learned metrics
(CLIP, RAFT, LPIPS) need downloaded weights, so none is used. Optical flow comes from OpenCV's
DIS estimator (`opencv-python-headless`, in requirements.txt; any OpenCV build with DIS works).
Without it the warp error is None and the report's "not_computed" says why and how to fix it.
"""

import math
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from kornia.filters import gaussian_blur2d
from kornia.metrics import ssim as ssim_map

LUMA = (0.299, 0.587, 0.114)


def to_unit(frames: torch.Tensor) -> torch.Tensor:
    return ((frames.float() + 1) / 2).clamp(0, 1)


def psnr(a: torch.Tensor, b: torch.Tensor, mask: Optional[torch.Tensor] = None) -> float:
    """PSNR in dB between frames in [-1, 1], over pixels where `mask` (broadcastable, 1 = counted) is set."""
    err = (to_unit(a) - to_unit(b)) ** 2
    mse = _masked_mean(err, mask)
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def ssim(a: torch.Tensor, b: torch.Tensor, mask: Optional[torch.Tensor] = None, window: int = 7) -> float:
    """Mean SSIM (Gaussian window) between frames in [-1, 1], over pixels where `mask` is set."""
    return _masked_mean(ssim_map(to_unit(a), to_unit(b), window), mask)


def edit_mask_from_first_frame(source0: torch.Tensor, edited0: torch.Tensor, threshold: float = 0.05,
                               grow: int = 7) -> torch.Tensor:
    """(1, 1, H, W) mask of where the user's edit changed frame 0 (grown by `grow` pixels), 1 = edited."""
    diff = (to_unit(edited0) - to_unit(source0)).abs().amax(dim=-3, keepdim=True).view(1, 1, *source0.shape[-2:])
    changed = (diff > threshold).float()
    return (F.max_pool2d(changed, 2 * grow + 1, stride=1, padding=grow) > 0).float()


def luminance(frames: torch.Tensor) -> torch.Tensor:
    weights = torch.tensor(LUMA, device=frames.device).view(1, 3, 1, 1)
    return (to_unit(frames) * weights).sum(1, keepdim=True)


def flicker(frames: torch.Tensor, sigma: float = 3.0) -> float:
    """Mean absolute change of low-passed luminance between consecutive frames (0 for a still video)."""
    if len(frames) < 2:
        return 0.0
    kernel = 2 * int(3 * sigma) + 1
    low = gaussian_blur2d(luminance(frames), (kernel, kernel), (sigma, sigma), border_type="replicate")
    return float((low[1:] - low[:-1]).abs().mean())


def warp_error_unavailable() -> Optional[str]:
    """Why the warp error cannot be computed here (no usable OpenCV), or None when it can."""
    try:
        import cv2
    except ImportError as error:
        return f"needs OpenCV's optical flow, which is not importable ({error}): pip install opencv-python-headless"
    if not hasattr(cv2, "DISOpticalFlow_create"):
        return f"OpenCV {getattr(cv2, '__version__', '?')} has no DIS optical flow: pip install opencv-python-headless>=4.8"
    return None


def warp_error(frames: torch.Tensor, occlusion_threshold: float = 1.0) -> Optional[float]:
    """Mean L1 between frame t and frame t+1 warped back by optical flow, occlusions masked out.

    None when OpenCV is not usable (`warp_error_unavailable` says why).
    """
    if warp_error_unavailable() is not None:
        return None
    if len(frames) < 2:
        return 0.0
    errors = [_pair_warp_error(frames[t], frames[t + 1], occlusion_threshold) for t in range(len(frames) - 1)]
    return float(sum(errors) / len(errors))


def seam_colour_drift(frames: torch.Tensor, seams: Sequence[int]) -> float:
    """Largest jump of per-channel mean colour across clip seams (frame s-1 -> s), on the [0, 1] scale."""
    means = to_unit(frames).mean(dim=(-2, -1))
    jumps = [float((means[s] - means[s - 1]).abs().max()) for s in seams if 0 < s < len(frames)]
    return max(jumps, default=0.0)


def video_report(source: torch.Tensor, output: torch.Tensor, edited_first: Optional[torch.Tensor] = None,
                 mask: Optional[torch.Tensor] = None, seams: Sequence[int] = ()) -> Dict[str, object]:
    """All metrics of an edit, each next to the source's own value where that normalises for real motion.

    Values are floats; a metric that cannot be computed here is None and named, with the reason, in
    report["not_computed"] (present only then).
    """
    if mask is None and edited_first is not None:
        mask = edit_mask_from_first_frame(source[0], edited_first)
    keep = None if mask is None else 1 - mask
    report = {
        "warp_error": warp_error(output), "warp_error_source": warp_error(source),
        "flicker": flicker(output), "flicker_source": flicker(source),
        "psnr_unedited": psnr(output, source, keep), "ssim_unedited": ssim(output, source, keep),
        "seam_colour_drift": seam_colour_drift(output, seams), "seam_colour_drift_source": seam_colour_drift(source, seams),
    }
    if edited_first is not None:
        report["first_frame_psnr"] = psnr(output[:1], edited_first[None])
    reason = warp_error_unavailable()
    if reason is not None:
        report["not_computed"] = {"warp_error": reason, "warp_error_source": reason}
    return report


def _masked_mean(values: torch.Tensor, mask: Optional[torch.Tensor]) -> float:
    if mask is None:
        return float(values.mean())
    weights = mask.float().expand_as(values)
    total = float(weights.sum())
    return float((values * weights).sum() / total) if total > 0 else float("nan")


def _flow(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Dense flow (H, W, 2) in pixels from frame a to frame b (OpenCV DIS on 8-bit luminance)."""
    import cv2
    gray = [(luminance(f[None])[0, 0] * 255).round().byte().cpu().numpy() for f in (a, b)]
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    return torch.from_numpy(dis.calc(gray[0], gray[1], None))


def _warp(frame: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Sample `frame` (C, H, W) at x + flow(x): brings the next frame back onto the current one."""
    h, w = flow.shape[:2]
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    gx = (xs + flow[..., 0]) / max(w - 1, 1) * 2 - 1
    gy = (ys + flow[..., 1]) / max(h - 1, 1) * 2 - 1
    grid = torch.stack([gx, gy], -1)[None]
    return F.grid_sample(frame[None].float(), grid, align_corners=True, padding_mode="border")[0]


def _pair_warp_error(current: torch.Tensor, following: torch.Tensor, occlusion_threshold: float) -> float:
    forward, backward = _flow(current, following), _flow(following, current)
    # forward-backward check: where flows do not cancel, the pixel is occluded or the flow is wrong
    round_trip = forward + _warp(backward.permute(2, 0, 1), forward).permute(1, 2, 0)
    valid = (round_trip.norm(dim=-1) < occlusion_threshold).float()[None]
    err = (to_unit(_warp(following, forward)) - to_unit(current)).abs().mean(0, keepdim=True)
    return _masked_mean(err, valid)
