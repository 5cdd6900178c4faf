"""The node side of the core's callbacks: IMAGE layout, progress, Cancel, status events, the backend.

ComfyUI IMAGE is (T, H, W, 3) in [0, 1]; the core's frames are (T, 3, H, W) in [-1, 1]: convert
here, at the node boundary, and nowhere else. Imported only inside ComfyUI (or the host tests).
"""

import contextlib
import sys
import time
from typing import Optional

import torch


def image_to_frames(image: torch.Tensor, name: str) -> torch.Tensor:
    """IMAGE (T, H, W, C) in [0, 1] -> core frames (T, 3, H, W) in [-1, 1] on the CPU."""
    if not isinstance(image, torch.Tensor) or image.ndim != 4:
        raise ValueError(f"{name} must be an IMAGE batch (frames, height, width, channels), got "
                         f"{getattr(image, 'shape', type(image).__name__)}")
    if image.shape[-1] == 4:  # RGBA from a PNG loader: the alpha channel is not part of the picture
        image = image[..., :3]
    if image.shape[-1] != 3:
        raise ValueError(f"{name} has {image.shape[-1]} channels; connect an RGB IMAGE")
    return (image.detach().float().cpu().movedim(-1, 1) * 2 - 1).clamp(-1, 1)


def frames_to_image(frames: torch.Tensor) -> torch.Tensor:
    """Core frames (T, 3, H, W) in [-1, 1] -> IMAGE (T, H, W, 3) in [0, 1], float32 on the CPU."""
    return ((frames.detach().float().cpu() + 1) / 2).clamp(0, 1).movedim(1, -1).contiguous()


def map_to_image(maps: torch.Tensor) -> torch.Tensor:
    """Difference maps (T, 1, H, W) in [0, 1] -> grey IMAGE (T, H, W, 3)."""
    return maps.detach().float().cpu().clamp(0, 1).expand(-1, 3, -1, -1).movedim(1, -1).contiguous()


def mask_to_frames(mask: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    """MASK (1 or T, H, W) -> (T, 1, H, W) matching `frames` (T, 3, H, W); resized if needed."""
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3 or mask.shape[0] not in (1, frames.shape[0]):
        raise ValueError(f"mask must be one MASK or one per frame ({frames.shape[0]}), got shape {tuple(mask.shape)}")
    mask = mask.detach().float().cpu()[:, None].clamp(0, 1)
    if tuple(mask.shape[-2:]) != tuple(frames.shape[-2:]):
        mask = torch.nn.functional.interpolate(mask, size=frames.shape[-2:], mode="bilinear", align_corners=False)
    return mask.expand(frames.shape[0], -1, -1, -1)


def node_id(node_class) -> Optional[str]:
    """The executing node's id (hidden input), None when a node is called outside the executor."""
    return getattr(getattr(node_class, "hidden", None), "unique_id", None)


def cancel_check():
    """The core's `cancel` callable: raises ComfyUI's own interrupt so the queue shows 'interrupted'."""
    import comfy.model_management

    def cancel() -> bool:
        comfy.model_management.throw_exception_if_processing_interrupted()
        return False
    return cancel


class NodeProgress:
    """The core's `progress` callable: ComfyUI progress bar + a status line under the node.

    The line (ComfyUI's progress text) carries stage, clip, step/total, loss and an ETA for the current
    stage, estimated from the seconds per step seen so far in it.
    """

    def __init__(self, node_id: Optional[str] = None):
        import comfy.utils

        self.node_id = node_id
        self.bar = comfy.utils.ProgressBar(1, node_id=node_id)
        self.started = time.perf_counter()
        self.stage_key, self.stage_started = None, self.started
        self.losses = {}  # clip -> training losses, for the loss curve

    def __call__(self, info: dict) -> None:
        stage, clip, clips = info["stage"], info["clip"], info["clips"]
        step, total = info["step"], max(1, info["total"])
        if (stage, clip) != self.stage_key:
            self.stage_key, self.stage_started = (stage, clip), time.perf_counter()
        if "loss" in info:
            self.losses.setdefault(clip, []).append(float(info["loss"]))
        done = clip * total + step  # progress over every clip of this stage
        self.bar.update_absolute(done, clips * total)
        elapsed = time.perf_counter() - self.stage_started
        remaining = (clips - clip) * total - step
        eta = elapsed / step * remaining if step > 0 else None
        send_text(self.node_id, status_text(info, eta))

    def finish(self, text: str = "done") -> None:
        send_text(self.node_id, f"{text} in {minutes(time.perf_counter() - self.started)}")


def minutes(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


def status_text(info: dict, eta: Optional[float] = None) -> str:
    """'train · clip 2/3 · step 40/250 · loss 0.0123 · ETA 4:10' (parts that do not apply are left out)."""
    parts = [info["stage"]]
    if info.get("clips", 1) > 1:
        parts.append(f"clip {info['clip'] + 1}/{info['clips']}")
    if info.get("total", 1) > 1:
        parts.append(f"step {info['step']}/{info['total']}")
    if "loss" in info:
        parts.append(f"loss {float(info['loss']):.4f}")
    if eta is not None:
        parts.append(f"ETA {minutes(eta)}")
    return " · ".join(parts)


def send_text(node_id: Optional[str], text: str) -> None:
    """Show text under the node (ComfyUI's progress text) when ComfyUI's server runs; in-process runs lack it,
    so the server module is looked up, never imported."""
    server = sys.modules.get("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is not None and node_id is not None:
        instance.send_progress_text(text, node_id, getattr(instance, "client_id", None))


@contextlib.contextmanager
def comfy_backend(model, clip_vision, vae, lora_from_model: bool = False):
    """A ComfyBackend on a clone of MODEL, released (patches undone, clone unloaded) whatever happens."""
    from i2vedit_core.backends.comfy import ComfyBackend

    backend = ComfyBackend(model, clip_vision, vae, lora_from_model)
    try:
        yield backend
    finally:
        backend.release()
