"""edit_video(): the whole I2VEdit pipeline on any SVD backend (ALGORITHM.md sections 1-7).

Three stages, usable one by one (the ComfyUI nodes do) or together through `edit_video`:
  invert_video   SARP + inversion of every clip (shared by all edits, cached);
  train_loras    one motion LoRA per clip (shared by all edits, cached);
  propagate      matched denoising of every edit, clip after clip, and VAE decode.
Clip k >= 1 of an edit is conditioned on that edit's last frame of clip k-1 (CLIP of the decoded
frame, conditioning latent straight from the final latent: no decode/encode round trip). The
output has the input's frame count and size; the working size is internal.
"""

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from .cache import ArtifactCache
from .clips import new_frames, split_clips
from .conditioning import MicroConditioning, latent_conditioning
from .editing import Clip0, EditResult, EditSettings, edit_clip
from .frames import as_frame_batch
from .inversion import Inversion, InversionSettings
from .lora import MotionLora
from .memory import MemoryPlan, MemoryPolicy, as_policy, oom_advice
from .resolution import Fit, from_working, plan_fit, to_working
from .stages import cached_inversion, cached_lora
from .training import TrainingSettings, training_size
from .validation import check_inputs

Progress = Callable[[dict], None]


class Cancelled(RuntimeError):
    """The host's cancel check returned true; nothing partial was cached."""


class OutOfMemory(torch.cuda.OutOfMemoryError):
    """GPU out of memory, re-raised with what to change (the original is `__cause__`). Still an
    OutOfMemoryError, so hosts that free memory on OOM (ComfyUI's executor) go on doing so."""


@contextmanager
def memory_hint(stage: str, plan: MemoryPlan):
    """Re-raise a GPU OOM inside `stage` as OutOfMemory naming the next memory setting down."""
    try:
        yield
    except torch.cuda.OutOfMemoryError as error:
        if isinstance(error, OutOfMemory):
            raise
        raise OutOfMemory(f"out of GPU memory during {stage}: {oom_advice(plan)}") from error


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
    memory: MemoryPolicy = MemoryPolicy()    # "auto", "fast", "24gb", "12gb" or a GiB budget (memory.py)
    paste_source: bool = True                # with a mask: the source's own pixels outside it (keep_source_outside)

    def __post_init__(self):
        # The clip layout is checked again by split_clips; checking here makes a bad setting fail at once.
        split_clips(self.clip_length, self.clip_length, self.overlap)
        object.__setattr__(self, "memory", as_policy(self.memory))  # a plain "24gb" or 16 is accepted too


def memory_plan(backend, settings: PipelineSettings) -> MemoryPlan:
    """The settings' memory plan on this backend's device, offloading switched to match."""
    plan = settings.memory.plan(backend.device, getattr(backend, "free_memory", None))
    set_offload = getattr(backend, "set_offload", None)  # optional backend hook
    if set_offload is not None:
        set_offload(plan.offload)
    return plan


def with_plan(settings: PipelineSettings, plan: MemoryPlan) -> PipelineSettings:
    """Settings pinned to one tier ("auto" resolved once per run) with training checkpointing from it, and
    training's compile switch from it unless the training settings name one."""
    training = settings.training
    if training is not None:
        compile_ = plan.compile if training.compile is None else training.compile
        training = replace(training, gradient_checkpointing=plan.checkpointing, compile=compile_)
    return replace(settings, memory=MemoryPolicy(plan.tier), training=training)


@dataclass
class PreparedVideo:
    """The source at the working size, split into clips."""
    source: torch.Tensor    # (T, 3, H, W) at the working size
    fit: Fit
    clips: List[range]
    skip_interval: bool

    def clip_frames(self, k: int) -> torch.Tensor:
        return self.source[self.clips[k].start:self.clips[k].stop]


@dataclass
class VideoEdit:
    frames: torch.Tensor           # (T, 3, H, W) in [-1, 1] at the source size
    difference_map: torch.Tensor   # (T, 1, H, W) in [0, 1]: where the edit departed from source attention


@dataclass
class PipelineResult:
    edits: List[VideoEdit]
    timings: Dict[str, float]
    clips: List[range]
    notes: List[str] = field(default_factory=list)  # what the user should know (also logged)


def prepare_video(frames, settings: PipelineSettings = PipelineSettings()) -> PreparedVideo:
    source = as_frame_batch(frames, "video frames", min_frames=2, size_multiple=1)
    fit = plan_fit(tuple(source.shape[-2:]), tuple(settings.working_size), settings.fit)
    clips = split_clips(len(source), settings.clip_length, settings.overlap)
    skip = settings.skip_interval if settings.skip_interval is not None else len(clips) > 1
    return PreparedVideo(to_working(source, fit), fit, clips, skip)


def edit_video(backend, frames, edited_first_frames, settings: PipelineSettings = PipelineSettings(),
               progress: Optional[Progress] = None, cancel: Optional[Callable[[], bool]] = None,
               cache: Optional[ArtifactCache] = None, mask: Optional[torch.Tensor] = None) -> PipelineResult:
    """frames: (T, 3, H, W) in [-1, 1], any size. edited_first_frames: (E, 3, H, W) or a list, one per edit,
    the same size as the video. mask: optional (H, W) in [0, 1], 1 = may change: latents are blended toward
    the source trajectory outside it (editing.edit_clip gives the exact rule) and, with
    settings.paste_source, the source's pixels are pasted back outside it. Returns one VideoEdit per edit.
    Every input is checked before the backend is used (validation.check_inputs: all problems in one
    InvalidInput). Under a process group of several processes (torchrun) the clips are fanned out
    (distributed.py)."""
    check_inputs(frames, edited_first_frames, mask, settings, backend.device)
    if mask is not None and not bool((torch.as_tensor(mask) > 0).any()):
        return _unchanged(frames, edited_first_frames, settings)
    from . import distributed  # it imports this module, hence here
    if distributed.fanned_out():
        return distributed.edit_video(backend, frames, edited_first_frames, settings, progress, cancel, cache, mask)
    settings = with_plan(settings, memory_plan(backend, settings))
    video = prepare_video(frames, settings)
    edits = check_edited_frames(edited_first_frames, video.fit)
    timings = {}
    started = time.perf_counter()
    inversions = invert_video(backend, video, settings, progress, cancel, cache)
    timings["invert"], started = time.perf_counter() - started, time.perf_counter()
    loras = train_loras(backend, video, settings, progress, cancel, cache) if settings.training is not None else None
    timings["train"], started = time.perf_counter() - started, time.perf_counter()
    results = propagate(backend, video, inversions, loras, edits, settings, progress, cancel, timings,
                        latent_mask(mask, video) if mask is not None else None)
    if mask is not None and settings.paste_source:
        results = [replace(r, frames=keep_source_outside(r.frames, frames, mask)) for r in results]
    return PipelineResult(results, timings, video.clips)


def invert_video(backend, video: PreparedVideo, settings: PipelineSettings, progress: Optional[Progress] = None,
                 cancel=None, cache: Optional[ArtifactCache] = None, only: Optional[List[int]] = None) -> List[Inversion]:
    """The inversion of every clip, or of the clips in `only` (clip 0 is inverted too when skip-interval needs it)."""
    report = reporter(progress, cancel)
    wanted = range(len(video.clips)) if only is None else only
    needs_clip0 = video.skip_interval and any(k > 0 for k in wanted)
    inversions: Dict[int, Inversion] = {}
    with memory_hint("inversion", memory_plan(backend, settings)):
        for k in sorted(set(wanted) | ({0} if needs_clip0 else set())):
            clip0 = inversions[0] if video.skip_interval and k > 0 else None
            callback = _step_reporter(report, "invert", k, len(video.clips), settings.inversion.steps)
            report("invert", k, len(video.clips), 0, settings.inversion.steps)
            inversions[k] = cached_inversion(backend, video.clip_frames(k), settings.inversion, cache, clip0, callback)
    return [inversions[k] for k in wanted]


def train_loras(backend, video: PreparedVideo, settings: PipelineSettings, progress: Optional[Progress] = None,
                cancel=None, cache: Optional[ArtifactCache] = None, only: Optional[List[int]] = None) -> List[MotionLora]:
    """One motion LoRA per clip (or per clip in `only`); the backend is left without an adapter."""
    plan = memory_plan(backend, settings)
    settings = with_plan(settings, plan)
    report = reporter(progress, cancel)
    loras = []
    clip0 = None
    try:
        with memory_hint("motion-LoRA training", plan):
            for k in range(len(video.clips)) if only is None else only:
                if video.skip_interval and k > 0 and clip0 is None:  # once; inverted with the base model
                    clip0 = _training_clip0(backend, video, settings, cache)
                report("train", k, len(video.clips), 0, settings.training.steps)
                loras.append(cached_lora(
                    backend, video.clip_frames(k), settings.training, cache, clip0=clip0, cancel=cancel,
                    progress=lambda p: report("train", k, len(video.clips), p["step"] + 1, p["steps"],
                                              loss=p["loss"])))
    finally:
        backend.detach_lora()
    return loras


def propagate(backend, video: PreparedVideo, inversions: List[Inversion], loras: Optional[List[MotionLora]],
              edits: torch.Tensor, settings: PipelineSettings, progress: Optional[Progress] = None, cancel=None,
              timings: Optional[Dict[str, float]] = None, mask: Optional[torch.Tensor] = None) -> List[VideoEdit]:
    """Matched denoising of every edit (E, 3, H, W) at the working size, clip after clip, then decode."""
    if len(inversions) != len(video.clips) or (loras is not None and len(loras) != len(video.clips)):
        raise ValueError(f"the video has {len(video.clips)} clips but got {len(inversions)} inversions and "
                         f"{'no' if loras is None else len(loras)} motion LoRAs: compute them from the same clips")
    for k, lora in enumerate(loras or []):
        # Weights fit any frame count, but a LoRA trained on a clip of another length is another clip's motion.
        trained = lora.metadata.get("source_frames")
        if trained is not None and trained != str(len(video.clips[k])):
            raise ValueError(f"motion LoRA {k + 1} was trained on a clip of {trained} frames but clip {k + 1} has "
                             f"{len(video.clips[k])}: train (or load) the motion LoRA with the same frames per clip "
                             "and overlap")
    plan = memory_plan(backend, settings)
    report = reporter(progress, cancel)
    timings = timings if timings is not None else {}
    frames = [[] for _ in edits]
    maps = [[] for _ in edits]
    results: List[List[EditResult]] = [[] for _ in edits]
    try:
        for k, inversion in enumerate(inversions):
            if loras is not None:
                backend.load_lora(loras[k])
                if video.skip_interval and k > 0:  # edited clip 0's K/V are recomputed with its own LoRA
                    backend.load_lora(loras[0], slot="clip0")
            for e in range(len(edits)):
                result, decoded = _edit_one_clip(backend, video, k, inversions, edits[e], results[e], frames[e],
                                                 settings, plan, loras is not None, report, timings, mask)
                # later clips need only clip 0 (skip-interval K/V) and the previous clip (hand-off)
                results[e] = results[e][:1] + [result] if results[e] else [result]
                frames[e].append(decoded)
                maps[e].append(_average_map(result, decoded.shape[0]))
    finally:
        if loras is not None:
            backend.detach_lora()
    return [_assemble(frames[e], maps[e], video) for e in range(len(edits))]


def _edit_one_clip(backend, video, k, inversions, edited_frame, earlier: List[EditResult], decoded_earlier,
                   settings, plan: MemoryPlan, with_lora, report, timings, mask=None):
    started = time.perf_counter()
    count = len(video.clips)
    clip0 = Clip0.of(inversions[0], earlier[0]) if video.skip_interval and k > 0 else None
    report("edit", k, count, 0, settings.inversion.steps)
    with memory_hint("denoising", plan):
        cond = edit_conditioning(backend, edited_frame, earlier[-1] if earlier else None,
                                  decoded_earlier[-1] if decoded_earlier else None, len(video.clips[k]), settings.micro)
        result = edit_clip(backend, inversions[k], cond, settings.edit, lora_scale=1.0 if with_lora else 0.0,
                           clip0=clip0, mask=mask,
                           callback=_step_reporter(report, "edit", k, count, settings.inversion.steps))
    timings["edit"] = timings.get("edit", 0.0) + time.perf_counter() - started
    started = time.perf_counter()
    with memory_hint("VAE decoding", plan):
        decoded = backend.decode(result.latent[0], plan.decode_chunk).cpu()
    timings["decode"] = timings.get("decode", 0.0) + time.perf_counter() - started
    report("decode", k, count, 1, 1)
    return result, decoded


def _training_clip0(backend, video: PreparedVideo, settings: PipelineSettings, cache):
    """Source clip 0 inverted at the training resolution: skip-interval K/V for training clips >= 1."""
    frames0 = video.clip_frames(0)
    size = training_size(frames0.shape[-2], frames0.shape[-1], settings.training.max_pixels)
    if size != tuple(frames0.shape[-2:]):
        frames0 = F.interpolate(frames0, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)
    return cached_inversion(backend, frames0, settings.inversion, cache)


def edit_conditioning(backend, edited_frame, previous: Optional[EditResult], previous_frames,
                       num_frames: int, micro: MicroConditioning):
    """Clip 0: the user's edited frame. Clip k: the previous clip's last frame (latent taken directly)."""
    if previous is None:
        frame = edited_frame.to(backend.device)
        embeds = backend.image_embedding(frame[None])
        latent = backend.encode(frame[None]) / backend.latent_scale
    else:
        embeds = backend.image_embedding(previous_frames[-1:].to(backend.device))
        latent = previous.latent[:, -1] / backend.latent_scale
    return latent_conditioning(embeds, latent, num_frames, micro)


def _average_map(result: EditResult, num_frames: int) -> torch.Tensor:
    return result.maps.average()[0] if result.maps.per_layer() else torch.zeros(num_frames, 1, 1)


def _assemble(clip_frames: List[torch.Tensor], clip_maps: List[torch.Tensor], video: PreparedVideo) -> VideoEdit:
    keep = new_frames(video.clips)
    frames = torch.cat([f[r.start - c.start:r.stop - c.start] for f, r, c in zip(clip_frames, keep, video.clips)])
    maps = [F.interpolate(m[:, None], size=video.fit.working_hw, mode="bilinear", align_corners=False)
            for m in clip_maps]
    maps = torch.cat([m[r.start - c.start:r.stop - c.start] for m, r, c in zip(maps, keep, video.clips)])
    difference = from_working(maps.expand(-1, 3, -1, -1) * 2 - 1, video.fit)[:, :1]
    return VideoEdit(from_working(frames, video.fit), ((difference + 1) / 2).clamp(0, 1))


def _unchanged(frames, edited_first_frames, settings: PipelineSettings) -> PipelineResult:
    """An all-black mask lets nothing change: the source is the result, with no inversion, training or edit."""
    source = as_frame_batch(frames, "video frames", min_frames=2, size_multiple=1)
    count = len(as_frame_batch(edited_first_frames, "edited first frames", size_multiple=1))
    note = ("the mask is all black, so nothing may change: returned the source unchanged (no inversion, training "
            "or editing); white marks where the edit may change the video")
    logging.getLogger(__name__).warning(note)
    maps = torch.zeros(len(source), 1, *source.shape[-2:])
    return PipelineResult([VideoEdit(source.clone(), maps.clone()) for _ in range(count)], {},
                          split_clips(len(source), settings.clip_length, settings.overlap), [note])


def latent_mask(mask: torch.Tensor, video: PreparedVideo) -> torch.Tensor:
    """A user mask (H, W) in [0, 1] at the source size -> (h, w) at the working latent size: what
    edit_clip blends with, for the CLI, the API and the nodes alike."""
    mask = check_mask(mask, video.fit)
    working = to_working(mask[None, None].expand(1, 3, -1, -1) * 2 - 1, video.fit)[:, :1]
    height, width = video.fit.working_hw
    return ((F.adaptive_avg_pool2d(working, (height // 8, width // 8)) + 1) / 2).clamp(0, 1)[0, 0]


def keep_source_outside(edited: torch.Tensor, source: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The final paste: mask * edited + (1 - mask) * source, frames (T, 3, H, W) and mask (H, W) at the source
    size, so where the mask is 0 the output is the source exactly (the VAE round trip is not)."""
    weight = torch.as_tensor(mask, dtype=torch.float32).reshape(1, 1, *source.shape[-2:]).to(edited)
    return weight * edited + (1 - weight) * source.to(edited)


def check_mask(mask, fit: Fit) -> torch.Tensor:
    """One (H, W) mask in [0, 1] at the source size (a leading axis of 1 is dropped), float32."""
    mask = torch.as_tensor(mask, dtype=torch.float32)
    if mask.ndim == 3 and mask.shape[0] == 1:
        mask = mask[0]
    if tuple(mask.shape) != tuple(fit.source_hw):
        raise ValueError(f"the mask is {'x'.join(map(str, mask.shape[::-1]))} but the video is "
                         f"{fit.source_hw[1]}x{fit.source_hw[0]}: give one (H, W) mask at the video's size")
    if not bool(torch.isfinite(mask).all()) or float(mask.min()) < 0 or float(mask.max()) > 1:
        raise ValueError("the mask must hold finite values in [0, 1] (1 = may change)")
    return mask


def check_edited_frames(edited, fit: Fit) -> torch.Tensor:
    """The edited first frames at the video's own size -> (E, 3, H, W) at the working size."""
    batch = as_frame_batch(edited, "edited first frames", min_frames=1, size_multiple=1)
    if tuple(batch.shape[-2:]) != tuple(fit.source_hw):
        raise ValueError(f"the edited first frame is {batch.shape[-1]}x{batch.shape[-2]} but the video is "
                         f"{fit.source_hw[1]}x{fit.source_hw[0]}: edit frame 0 at the video's own size "
                         "(or resize it to match)")
    return to_working(batch, fit)


def reporter(progress: Optional[Progress], cancel: Optional[Callable[[], bool]]):
    """report(stage, clip, clips, step, total, **extra): checks cancel first, then tells the host."""
    def report(stage, clip, clips, step, total, **extra):
        if cancel is not None and cancel():
            raise Cancelled(f"cancelled during {stage} of clip {clip + 1}/{clips}")
        if progress is not None:
            progress(dict(stage=stage, clip=clip, clips=clips, step=step, total=total, **extra))
    return report


def _step_reporter(report, stage, clip, clips, total):
    return lambda info: report(stage, clip, clips, info["i"] + 1, total)
