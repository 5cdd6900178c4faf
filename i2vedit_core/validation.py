"""One validation pass over a run's inputs and settings, before any model is loaded or used.

The CLI, `pipeline.edit_video` and the nodes call it. Checks collect problems instead of stopping at
the first, so a user sees everything to fix at once, in one line. A problem is tagged with the API's
name for what is wrong (`clip_length`, `edit.min_guidance`, `mask`, ...); each entry point renders
the tags, and the API names inside the core's messages, in its own words: CLI flags, node widgets,
or the API's own field names (`Names`).
"""

import os
import re
from dataclasses import dataclass, field, replace
from typing import Callable, List, Mapping, Optional, Tuple

import torch

from .clips import split_clips
from .frames import as_frame_batch
from .resolution import plan_fit

NAME = "<name>"  # placeholder in this module's messages for the entry point's name of the problem's field
GIB = 2 ** 30
RANGE_SLACK = 1e-3


@dataclass(frozen=True)
class Names:
    """How an entry point calls the API's fields (`fields`) and phrases of the core's messages (`phrases`)."""
    fields: Mapping[str, str] = field(default_factory=dict)
    phrases: Mapping[str, str] = field(default_factory=dict)

    def of(self, name: str) -> str:
        return self.fields.get(name, name)

    def using(self, **fields: str) -> "Names":
        """The same names with some fields renamed (one node calls its input `edited_first_frame`)."""
        return replace(self, fields={**self.fields, **fields})

    def render(self, name: str, message: str) -> str:
        label = self.of(name)
        if self.phrases:
            pattern = "|".join(re.escape(p) for p in sorted(self.phrases, key=len, reverse=True))
            message = re.sub(rf"(?<![\w-])(?:{pattern})(?![\w])", lambda m: self.phrases[m.group(0)], message)
        if NAME in message:
            return message.replace(NAME, label)
        return message if label in message else f"{label}: {message}"


API = Names()
CLI = Names(
    fields={"frames": "--video", "edited_first_frames": "--edited", "mask": "--mask", "clip_length": "--frames-per-clip",
            "overlap": "--overlap", "working_size": "--size", "fit": "--fit", "inversion.steps": "--steps",
            "training.steps": "--train-steps", "edit.min_guidance": "--guidance MIN",
            "edit.max_guidance": "--guidance MAX", "edit.matching.thresholds": "--thr",
            "edit.matching.temporal": "--beta", "cache": "--cache", "out": "--out", "svd": "--svd",
            "max_frames": "--max-frames", "stride": "--stride", "fps": "--fps", "mask_threshold": "--mask-threshold"},
    phrases={"inversion steps": "--steps", "training steps": "--train-steps",
             "pass training=None": "use --train-steps 0", "min_guidance": "--guidance MIN",
             "max_guidance": "--guidance MAX", "mask thresholds": "--thr", "temporal steps need": "--beta needs",
             "beta1": "B1", "beta2": "B2", "clip_length": "--frames-per-clip", "overlap": "--overlap",
             "the working size": "--size", "a smaller working size": "a smaller --size",
             "e.g. 1024x576": "e.g. --size 1024 576", "edited first frames": "--edited images",
             "video frames": "--video frames"})
NODES = Names(
    fields={"clip_length": "frames_per_clip", "working_size": "working_width/working_height",
            "inversion.steps": "steps", "training.steps": "training_steps", "edit.min_guidance": "min_guidance",
            "edit.max_guidance": "max_guidance", "edit.matching.thresholds": "threshold_first/threshold_last",
            "edit.matching.temporal": "beta1/beta2", "inversion.sarp_alpha": "sarp_scale",
            "training.learning_rate": "learning_rate", "training.lora.rank": "rank"},
    phrases={"inversion steps": "steps", "training steps": "training_steps",
             "pass training=None": "switch train_motion_lora off", "mask thresholds": "threshold_first/threshold_last",
             "clip_length": "frames_per_clip", "the working size": "working_width x working_height",
             "sarp_alpha": "sarp_scale", "LoRA rank": "rank"})


class InvalidInput(ValueError):
    """Every problem found, in one line. `problems`: (API name, rendered message) pairs."""

    def __init__(self, problems: List[Tuple[str, str]]):
        self.problems = problems
        texts = [" ".join(text.split()) for _, text in problems]
        super().__init__(texts[0] if len(texts) == 1 else
                         f"{len(texts)} problems: " + "; ".join(f"({i + 1}) {t}" for i, t in enumerate(texts)))


class Problems:
    """Collects problems; `attempt` runs a check that raises ValueError and files its message instead."""

    def __init__(self, names: Names = API):
        self.names = names
        self.items: List[Tuple[str, str]] = []

    def add(self, name: str, message: str) -> None:
        self.items.append((name, self.names.render(name, message)))

    def attempt(self, name: str, check: Callable, *args, **kwargs):
        try:
            return check(*args, **kwargs)
        except ValueError as error:
            self.add(name, str(error))
            return None

    def has(self, name: str) -> bool:
        return any(n == name for n, _ in self.items)

    def raise_if_any(self) -> None:
        if self.items:
            raise InvalidInput(self.items)


def check_inputs(frames, edited, mask, settings, device=None, names: Names = API,
                 problems: Optional[Problems] = None) -> None:
    """Frames, edited first frames, mask and settings of one edit_video run, and its memory floor on `device`.

    frames: (T, 3, H, W) in [-1, 1]; edited: (E, 3, H, W) or a list; mask: None or (H, W) in [0, 1].
    settings: PipelineSettings, or None to skip what depends on them (their own problems are known).
    edited None: already reported. Raises InvalidInput naming every problem (pass `problems` to add them to others and raise later).
    """
    own = problems is None
    problems = Problems(names) if own else problems
    source = problems.attempt("frames", as_frame_batch, frames, "video frames", min_frames=2, size_multiple=1)
    edits = None if edited is None else problems.attempt("edited_first_frames", as_frame_batch, edited,
                                                         "edited first frames", min_frames=1, size_multiple=1)
    if source is not None:
        hw = tuple(source.shape[-2:])
        if edits is not None and tuple(edits.shape[-2:]) != hw:
            problems.add("edited_first_frames", f"{NAME} is {_wxh(edits.shape[-2:])} but the video is {_wxh(hw)}: "
                                                "edit frame 0 at the video's own size (or resize it to match)")
        if mask is not None:
            check_mask(problems, mask, hw)
        fit = None if settings is None else problems.attempt("working_size", plan_fit, hw,
                                                             tuple(settings.working_size), settings.fit)
        if fit is not None:
            check_memory(problems, fit.working_hw, hw, len(source), 1 if edits is None else len(edits), settings,
                         device)
    if own:
        problems.raise_if_any()


def check_mask(problems: Problems, mask, hw: Tuple[int, int], name: str = "mask") -> None:
    """One (H, W) (or (1, H, W)) mask at the video's size, finite, in [0, 1] (1 = may change)."""
    if not isinstance(mask, torch.Tensor):
        problems.add(name, f"{NAME} must be a tensor, got {type(mask).__name__}")
        return
    shape = tuple(mask.shape[1:]) if mask.ndim == 3 and mask.shape[0] == 1 else tuple(mask.shape)
    if len(shape) != 2 or shape != tuple(hw):
        problems.add(name, f"{NAME} is {'x'.join(map(str, shape[::-1]))} but the video is {_wxh(hw)}: give one "
                           "(H, W) mask at the video's size")
    elif not bool(torch.isfinite(mask).all()) or float(mask.min()) < 0 or float(mask.max()) > 1:
        problems.add(name, f"{NAME} must hold finite values in [0, 1] (1 = may change)")


def check_memory(problems: Problems, working_hw, source_hw, num_frames: int, edits: int, settings,
                 device=None) -> None:
    need = memory_floor(working_hw, source_hw, num_frames, edits, settings.clip_length,
                        getattr(settings, "decode_chunk", 8))
    have, where = available_memory(device)
    if have is not None and need > have:
        problems.add("working_size", f"{NAME} {_wxh(working_hw)} for {num_frames} frames needs at least "
                                     f"{need / GIB:.1f} GiB, more than the {where} ({have / GIB:.1f} GiB): use a "
                                     "smaller working size (e.g. 1024x576) or fewer frames")


def memory_floor(working_hw, source_hw, num_frames: int, edits: int, clip_length: int, decode_chunk: int) -> int:
    """Bytes a run needs at the least, whatever the model: the frames it holds in float32 (the source at
    the working size, each edit at the source size) and one decode chunk at SVD's finest decoder level
    (128 channels, input and output, half precision). A real run needs GiBs more: this floor refuses
    only runs that cannot fit, never one that could."""
    (h, w), (sh, sw) = working_hw, source_hw
    held = 4 * 3 * num_frames * (h * w + edits * sh * sw)
    decode = 2 * 128 * 2 * min(decode_chunk, clip_length, num_frames) * h * w
    return held + decode


def available_memory(device=None) -> Tuple[Optional[int], str]:
    """(bytes, what they are) of the device a run will use: a GPU's total memory, or the RAM available
    now on CPU; (None, ...) where it cannot be told."""
    device = torch.device(device if device is not None else "cpu")
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory, f"GPU memory of {device}"
    if device.type == "cpu":
        return _ram_available(), "RAM available"
    return None, str(device)


def _ram_available() -> Optional[int]:
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_settings(problems: Problems, *, clip_length=None, overlap=None, working_size=None, fit="resize",
                   inversion_steps=None, training_steps=None, guidance=None, thresholds=None, betas=None) -> None:
    """User-facing numbers, each checked by the definition the run will use (the settings' own checks),
    one at a time so that every bad value is reported. None: not given (the default is fine)."""
    from .attention import MatchSettings, TemporalSelector
    from .editing import EditSettings
    from .inversion import InversionSettings
    from .training import TrainingSettings

    if clip_length is not None and problems.attempt("clip_length", split_clips, clip_length, clip_length, 0) \
            is not None and overlap is not None:
        problems.attempt("overlap", split_clips, clip_length, clip_length, overlap)
    if working_size is not None:
        problems.attempt("working_size", plan_fit, tuple(working_size), tuple(working_size), fit)
    if inversion_steps is not None:
        problems.attempt("inversion.steps", InversionSettings, steps=inversion_steps)
    if training_steps is not None:
        problems.attempt("training.steps", TrainingSettings, steps=training_steps)
    if guidance is not None:
        problems.attempt("edit.min_guidance", EditSettings, min_guidance=guidance[0])
        problems.attempt("edit.max_guidance", EditSettings, max_guidance=guidance[1])
    if thresholds is not None:
        problems.attempt("edit.matching.thresholds", MatchSettings, thresholds=tuple(thresholds))
    if betas is not None:
        problems.attempt("edit.matching.temporal", TemporalSelector, *betas)


def check_image(problems: Problems, name: str, image) -> None:
    """A ComfyUI IMAGE (T, H, W, 3 or 4) in [0, 1]. An alpha channel is dropped where it is fully opaque
    and refused where it is not (what the hidden pixels should be is the user's choice, not ours)."""
    if not isinstance(image, torch.Tensor) or image.ndim != 4:
        problems.add(name, f"{NAME} must be an IMAGE batch (frames, height, width, channels), got "
                           f"{tuple(getattr(image, 'shape', ())) or type(image).__name__}")
        return
    if image.shape[-1] not in (3, 4):
        problems.add(name, f"{NAME} has {image.shape[-1]} channels: connect an RGB IMAGE")
        return
    if not bool(torch.isfinite(image).all()):
        problems.add(name, f"{NAME} contains NaN or infinite values: check the node that produced it")
        return
    lo, hi = float(image.min()), float(image.max())
    if lo < -RANGE_SLACK or hi > 1 + RANGE_SLACK:
        problems.add(name, f"{NAME} has values in [{lo:.4g}, {hi:.4g}], not [0, 1] (16-bit values not scaled?): "
                           "scale it to [0, 1] (16-bit: divide by 65535) before connecting it")
    elif image.shape[-1] == 4 and float(image[..., 3].min()) < 1 - 0.5 / 255:
        problems.add(name, f"{NAME} is RGBA with transparent pixels: flatten it onto a background first "
                           "(or pass the transparency as the mask)")


def check_image_mask(problems: Problems, name: str, mask, hw: Tuple[int, int], frames: int) -> None:
    """A ComfyUI MASK: (H, W) or (1 or T, H, W) at the video's size, in [0, 1]."""
    if not isinstance(mask, torch.Tensor) or mask.ndim not in (2, 3):
        problems.add(name, f"{NAME} must be a MASK (height, width) or (count, height, width), got "
                           f"{tuple(getattr(mask, 'shape', ())) or type(mask).__name__}")
        return
    count = 1 if mask.ndim == 2 else mask.shape[0]
    if count not in (1, frames):
        problems.add(name, f"{NAME} holds {count} masks: give one, or one per frame ({frames})")
    if tuple(mask.shape[-2:]) != tuple(hw):
        problems.add(name, f"{NAME} is {_wxh(mask.shape[-2:])} but the video is {_wxh(hw)}: give a MASK of the "
                           "video's size (resize it first)")
    elif not bool(torch.isfinite(mask).all()) or float(mask.min()) < -RANGE_SLACK or \
            float(mask.max()) > 1 + RANGE_SLACK:
        problems.add(name, f"{NAME} must hold finite values in [0, 1] (1 = may change)")


def check_node_inputs(names: Names, frames=None, edited=None, mask=None, video_hw=None, video_frames=None) -> None:
    """A node's IMAGE and MASK inputs (ComfyUI layouts) before anything runs: each one's layout, range and
    alpha, and the edited frame(s) and MASK against the video's size (from `frames`, or `video_hw` and
    `video_frames` where the video came earlier). Raises InvalidInput naming the inputs."""
    problems = Problems(names)
    fine = {}
    for name, image in (("frames", frames), ("edited_first_frames", edited)):
        if image is not None:
            before = len(problems.items)
            check_image(problems, name, image)
            fine[name] = len(problems.items) == before
    if fine.get("frames"):
        video_hw, video_frames = tuple(frames.shape[1:3]), frames.shape[0]
    if video_hw is not None:
        if fine.get("edited_first_frames") and tuple(edited.shape[1:3]) != tuple(video_hw):
            problems.add("edited_first_frames", f"{NAME} is {_wxh(edited.shape[1:3])} but the video is "
                                                f"{_wxh(video_hw)}: edit frame 0 at the video's own size (or resize "
                                                "it to match)")
        if mask is not None:
            check_image_mask(problems, "mask", mask, video_hw, video_frames)
    problems.raise_if_any()


def _wxh(hw) -> str:
    return f"{int(hw[-1])}x{int(hw[-2])}"
