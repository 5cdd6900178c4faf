"""edit_video(): the whole I2VEdit pipeline on any SVD backend (ALGORITHM.md sections 1-7).

Per clip: SARP + inversion -> motion LoRA -> matched denoising of every edit -> VAE decode.
Inversion and LoRA are shared by all edits and cached. Clip k >= 1 of an edit is conditioned on
that edit's last frame of clip k-1 (CLIP of the decoded frame, conditioning latent straight from
the final latent: no decode/encode round trip). The output has the input's frame count and size.
"""

import time
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from .cache import ArtifactCache
from .clips import new_frames, split_clips
from .conditioning import MicroConditioning, latent_conditioning
from .editing import Clip0, EditResult, EditSettings, edit_clip
from .frames import as_frame_batch
from .inversion import InversionSettings
from .resolution import from_working, plan_fit, to_working
from .stages import cached_inversion, cached_lora
from .training import TrainingSettings, training_size

Progress = Callable[[dict], None]


class Cancelled(RuntimeError):
    """The host's cancel check returned true; nothing partial was cached."""


@dataclass(frozen=True)
class PipelineSettings:
    clip_length: int = 14
    overlap: int = 1
    working_size: tuple = (576, 1024)
    fit: str = "resize"                      # "resize" or "pad": aspect ratio kept either way
    inversion: InversionSettings = field(default_factory=InversionSettings)
    training: Optional[TrainingSettings] = field(default_factory=TrainingSettings)  # None: no motion LoRA
    edit: EditSettings = field(default_factory=EditSettings)
    micro: MicroConditioning = field(default_factory=MicroConditioning)  # of the edit (fps id 6)
    skip_interval: Optional[bool] = None     # None: on when the video has several clips
    decode_chunk: int = 8


@dataclass
class VideoEdit:
    frames: torch.Tensor           # (T, 3, H, W) in [-1, 1] at the source size
    difference_map: torch.Tensor   # (T, 1, H, W) in [0, 1]: where the edit departed from source attention


@dataclass
class PipelineResult:
    edits: List[VideoEdit]
    timings: Dict[str, float]
    clips: List[range]


def edit_video(backend, frames, edited_first_frames, settings: PipelineSettings = PipelineSettings(),
               progress: Optional[Progress] = None, cancel: Optional[Callable[[], bool]] = None,
               cache: Optional[ArtifactCache] = None) -> PipelineResult:
    """frames: (T, 3, H, W) in [-1, 1], any size. edited_first_frames: (E, 3, H, W) or a list, one per edit,
    the same size as the video. Returns one VideoEdit per edit."""
    source = as_frame_batch(frames, "video frames", min_frames=2, size_multiple=1)
    edits = _edited_frames(edited_first_frames, source.shape[-2:])
    fit = plan_fit(tuple(source.shape[-2:]), tuple(settings.working_size), settings.fit)
    working, edits_working = to_working(source, fit), to_working(edits, fit)
    clips = split_clips(len(source), settings.clip_length, settings.overlap)
    skip = settings.skip_interval if settings.skip_interval is not None else len(clips) > 1
    report = _reporter(progress, cancel)
    timings: Dict[str, float] = {"invert": 0.0, "train": 0.0, "edit": 0.0, "decode": 0.0}
    state = _EditState(len(edits))
    try:
        for k, clip in enumerate(clips):
            _run_clip(backend, k, len(clips), working[clip.start:clip.stop], edits_working, settings, skip and k > 0,
                      state, report, cancel, cache, timings)
    finally:
        if settings.training is not None and hasattr(backend, "detach_lora"):
            backend.detach_lora()  # never leave a clip's LoRA attached to the caller's model
    results = [_assemble(state.frames[e], state.maps[e], clips, fit) for e in range(len(edits))]
    return PipelineResult(results, timings, clips)


@dataclass
class _EditState:
    """What later clips need from earlier ones, per edit."""
    count: int
    frames: List[List[torch.Tensor]] = field(default_factory=list)   # decoded clips (CPU)
    maps: List[List[torch.Tensor]] = field(default_factory=list)     # difference maps per clip (CPU)
    last: List[Optional[EditResult]] = field(default_factory=list)   # result of the previous clip
    first: List[Optional[EditResult]] = field(default_factory=list)  # result of clip 0 (skip-interval)
    source0: Optional[torch.Tensor] = None  # source clip 0 at the working size
    inversion0: object = None
    training_inversion0: object = None

    def __post_init__(self):
        self.frames = [[] for _ in range(self.count)]
        self.maps = [[] for _ in range(self.count)]
        self.last = [None] * self.count
        self.first = [None] * self.count


def _run_clip(backend, k, clip_count, clip_frames, edits, settings, skip, state, report, cancel, cache, timings):
    steps = settings.inversion.steps
    started = time.perf_counter()
    inversion = cached_inversion(backend, clip_frames, settings.inversion, cache,
                                 clip0=state.inversion0 if skip else None,
                                 callback=lambda i: report("invert", k, clip_count, i["i"] + 1, steps))
    if k == 0:
        state.source0, state.inversion0 = clip_frames, inversion
    timings["invert"] += time.perf_counter() - started

    started = time.perf_counter()
    lora_scale = 0.0
    if settings.training is not None:
        clip0 = _training_clip0(backend, state, settings, cache) if skip else None
        cached_lora(backend, clip_frames, settings.training, cache, clip0=clip0, cancel=cancel,
                    progress=lambda p: report("train", k, clip_count, p["step"], p["steps"], loss=p["loss"]))
        lora_scale = 1.0
    timings["train"] += time.perf_counter() - started

    for e in range(len(edits)):
        started = time.perf_counter()
        cond = _edit_conditioning(backend, edits[e], state.last[e], state.frames[e], clip_frames.shape[0],
                                  settings.micro)
        result = edit_clip(backend, inversion, cond, settings.edit, lora_scale=lora_scale,
                           clip0=Clip0.of(state.inversion0, state.first[e]) if skip else None,
                           callback=lambda i: report("edit", k, clip_count, i["i"] + 1, steps, edit=e))
        timings["edit"] += time.perf_counter() - started
        started = time.perf_counter()
        decoded = backend.decode(result.latent[0], settings.decode_chunk).cpu()
        timings["decode"] += time.perf_counter() - started
        report("decode", k, clip_count, 1, 1, edit=e)
        state.frames[e].append(decoded)
        state.maps[e].append(result.maps.average()[0] if result.maps.per_layer() else torch.zeros(decoded.shape[0], 1, 1))
        state.last[e] = result
        if k == 0:
            state.first[e] = result


def _training_clip0(backend, state, settings, cache):
    """Source clip 0 inverted at the training resolution: skip-interval K/V for training clips >= 1."""
    if state.training_inversion0 is None:
        frames0 = state.source0
        size = training_size(frames0.shape[-2], frames0.shape[-1], settings.training.max_pixels)
        if size != tuple(frames0.shape[-2:]):
            frames0 = F.interpolate(frames0, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)
        state.training_inversion0 = cached_inversion(backend, frames0, settings.inversion, cache)
    return state.training_inversion0


def _edit_conditioning(backend, edited_frame, previous: Optional[EditResult], decoded: Sequence[torch.Tensor],
                       num_frames: int, micro: MicroConditioning):
    """Clip 0: the user's edited frame. Clip k: the previous clip's last frame (latent taken directly)."""
    if previous is None:
        frame = edited_frame.to(backend.device)
        embeds = backend.image_embedding(frame[None])
        latent = backend.encode(frame[None]) / backend.latent_scale
    else:
        embeds = backend.image_embedding(decoded[-1][-1:].to(backend.device))
        latent = previous.latent[:, -1] / backend.latent_scale
    return latent_conditioning(embeds, latent, num_frames, micro)


def _assemble(clip_frames: List[torch.Tensor], clip_maps: List[torch.Tensor], clips: List[range], fit) -> VideoEdit:
    keep = new_frames(clips)
    frames = torch.cat([f[r.start - c.start:r.stop - c.start] for f, r, c in zip(clip_frames, keep, clips)])
    height, width = fit.working_hw
    maps = [F.interpolate(m[:, None], size=(height, width), mode="bilinear", align_corners=False)
            for m in clip_maps]
    maps = torch.cat([m[r.start - c.start:r.stop - c.start] for m, r, c in zip(maps, keep, clips)])
    return VideoEdit(from_working(frames, fit), from_working(maps.expand(-1, 3, -1, -1), fit)[:, :1].clamp(0, 1))


def _edited_frames(edited, size) -> torch.Tensor:
    batch = as_frame_batch(edited, "edited first frames", min_frames=1, size_multiple=1)
    if tuple(batch.shape[-2:]) != tuple(size):
        raise ValueError(f"the edited first frame is {batch.shape[-1]}x{batch.shape[-2]} but the video is "
                         f"{size[1]}x{size[0]}: edit frame 0 at the video's own size (or resize it to match)")
    return batch


def _reporter(progress: Optional[Progress], cancel: Optional[Callable[[], bool]]):
    def report(stage, clip, clips, step, total, **extra):
        if cancel is not None and cancel():
            raise Cancelled(f"cancelled during {stage} of clip {clip + 1}/{clips}")
        if progress is not None:
            progress(dict(stage=stage, clip=clip, clips=clips, step=step, total=total, **extra))
    return report
