"""Cached per-clip stages of the pipeline: inversion and motion-LoRA training.

Both are shared by every edit of the same source clip and keyed by a fingerprint of what
produced them (frames, settings, model, skip-interval context), so a second edit skips them.
"""

import json
from dataclasses import replace
from typing import Callable, Optional

import torch

from .backends.base import Conditioning
from .cache import ArtifactCache, fingerprint
from .inversion import Inversion, InversionSettings, invert_clip
from .lora import LoraSpec, MotionLora
from .training import TrainingSettings, train_motion_lora


def model_identity(backend) -> str:
    """What identifies the model's weights for cache keys: the backend's `identity()` (SVDBackend).

    No fallback to id(): a new model at a freed object's address would reuse another model's entries.
    """
    identity = getattr(backend, "identity", None)
    if not callable(identity):
        raise TypeError(f"{type(backend).__name__} has no identity(), so its results cannot be cached: implement "
                        f"SVDBackend.identity() (a fingerprint of the weights) or run without a cache")
    return identity()


def cached_inversion(backend, frames: torch.Tensor, settings: InversionSettings, cache: Optional[ArtifactCache],
                     clip0: Optional[Inversion] = None, callback=None) -> Inversion:
    key = None if cache is None else "inversion-" + fingerprint(frames, settings, model_identity(backend),
                                                              None if clip0 is None else clip0.latents[0])
    entry = cache.get(key) if cache is not None else None
    if entry is not None:
        return _inversion_from_tensors(entry[0], backend.device)
    inversion = invert_clip(backend, frames, settings, callback=callback, clip0=clip0)
    if cache is not None:
        cache.put(key, _inversion_tensors(inversion))
    return inversion


def cached_lora(backend, frames: torch.Tensor, settings: TrainingSettings, cache: Optional[ArtifactCache],
                clip0: Optional[Inversion] = None, progress=None, cancel: Optional[Callable[[], bool]] = None) -> MotionLora:
    """Train (or fetch) the motion LoRA of a clip and leave it attached to the backend."""
    # Checkpointing and compiling (the memory policy's) compute the same function: not part of the key.
    keyed = replace(settings, gradient_checkpointing=False, compile=None)
    key = None if cache is None else "lora-" + fingerprint(frames, keyed,
                                                         model_identity(backend),
                                                         None if clip0 is None else clip0.latents[0])
    entry = cache.get(key) if cache is not None else None
    if entry is not None:
        lora = _lora_from_entry(*entry)
        backend.load_lora(lora)
        return lora
    lora = train_motion_lora(backend, frames, settings, progress=progress, cancel=cancel, clip0=clip0).lora
    if cache is not None:
        cache.put(key, lora.weights, dict(lora.metadata, spec=json.dumps([lora.spec.rank, lora.spec.attn1_only,
                                                                           lora.spec.dropout])))
    return lora


def _inversion_tensors(inversion: Inversion) -> dict:
    cond = inversion.cond
    return {"sigmas": inversion.sigmas, "latents": inversion.latents, "image_embeds": cond.image_embeds,
            "image_latents": cond.image_latents, "time_ids": cond.time_ids}


def _inversion_from_tensors(tensors: dict, device) -> Inversion:
    cond = Conditioning(tensors["image_embeds"].to(device), tensors["image_latents"].to(device),
                        tensors["time_ids"].to(device))
    return Inversion(tensors["sigmas"], tensors["latents"].to(device), cond)


def _lora_from_entry(weights: dict, metadata: dict) -> MotionLora:
    rank, attn1_only, dropout = json.loads(metadata["spec"])
    rest = {k: v for k, v in metadata.items() if k != "spec"}
    return MotionLora(LoraSpec(rank, attn1_only, dropout), weights, rest, "<cache>")
