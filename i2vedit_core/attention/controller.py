"""The attention controller: what every spatial/temporal self-attention call does at a given step.

Host-free: hosts call `pass_(q, k, v, site)` with head-split tensors and an `AttentionSite` (site.py)
and use the returned attention output. A controller makes *passes*, one per model evaluation:

  source_pass()        base-model forward on the source latent: keeps spatial q/k and the temporal
                       probabilities the selector will need (capture);
  edit_pass(rows)      the edit forward: conditional rows matched against what the source pass kept
                       (kv_into=other: also keeps its temporal K/V in `other`'s buffer, the way an
                       edited clip 0 feeds the skip-interval of a later clip);
  kv_pass(rows)        clip-0 forward: keeps temporal K/V per row role for skip-interval;
  plain_pass(rows)     fused attention only (plus skip-interval K/V when enabled).

With `skip_interval=True` every temporal call of source/edit/plain passes prepends the clip-0 K/V
kept by the kv_pass of the same step. Everything kept lives in a per-step buffer that
`begin_step` replaces: nothing survives a step, nothing is written to disk.
"""

from dataclasses import dataclass, field
from typing import Dict, Optional, Set, Tuple

import torch

from ..backends.base import state_float
from .distance import DEFAULT_BUDGET
from .fused import sdpa
from .maps import DifferenceMaps
from .matching import DEFAULT_THRESHOLDS, check_thresholds, matched_attention, threshold_ramp
from .site import AttentionSite
from .temporal import TemporalSelector

CFG_ROWS = ("uncond", "cond")


@dataclass(frozen=True)
class MatchSettings:
    thresholds: Tuple[float, float] = DEFAULT_THRESHOLDS  # mask threshold at the first and last frame
    temporal: TemporalSelector = TemporalSelector()       # [beta1, beta2] = the "local" preset
    match_spatial: bool = True
    match_temporal: bool = True
    chunk_budget: int = DEFAULT_BUDGET  # elements per intermediate of the CPU row distance
    use_triton: bool = True             # on CUDA, when triton is installed
    official_ramp: bool = False         # threshold ramp by f/F (official) instead of reaching thr1 at the last frame

    def __post_init__(self):
        check_thresholds(self.thresholds)
        if self.chunk_budget < 1:
            raise ValueError(f"chunk_budget must be a positive element count, got {self.chunk_budget}")


@dataclass
class StepBuffer:
    """What one step keeps. spatial: path -> (q, k) of the source rows; probs: path -> source temporal
    probabilities; clip0_kv: path -> role -> (k, v); masks: path -> M (videos, F, N) of this step;
    temporal_source: paths whose edit pass used the source probabilities this step."""
    spatial: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    probs: Dict[str, torch.Tensor] = field(default_factory=dict)
    clip0_kv: Dict[str, Dict[str, Tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    masks: Dict[str, torch.Tensor] = field(default_factory=dict)
    temporal_source: Set[str] = field(default_factory=set)


@dataclass(frozen=True)
class AttentionPass:
    """The controller as one model evaluation sees it. `rows` tells a host without its own notion of
    CFG rows (diffusers) the role of each video of the batch."""
    controller: "AttentionController"
    rows: Tuple[str, ...]
    capture_source: bool = False
    capture_kv: bool = False
    concat_kv: bool = False
    match: bool = False
    kv_into: Optional["AttentionController"] = None  # where capture_kv keeps K/V (None: this controller)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, site: AttentionSite) -> torch.Tensor:
        return self.controller.attend(q, k, v, site, self)

    def __deepcopy__(self, memo):  # ComfyUI deep-copies transformer_options: share, do not copy
        return self


class AttentionController:
    def __init__(self, settings: MatchSettings = MatchSettings(), steps: int = 25, skip_interval: bool = False):
        self.settings, self.steps, self.skip_interval = settings, steps, skip_interval
        self.step = 0
        self.buffer = StepBuffer()
        self.maps = DifferenceMaps()

    def begin_step(self, step: int) -> None:
        self.step, self.buffer = step, StepBuffer()

    def release(self) -> None:
        """Drop this step's attention tensors as soon as the edit forward is done; keep its masks."""
        self.buffer.spatial.clear()
        self.buffer.probs.clear()
        self.buffer.clip0_kv.clear()

    def end(self) -> None:
        self.buffer = StepBuffer()

    def source_pass(self) -> AttentionPass:
        return AttentionPass(self, ("source",), capture_source=True, concat_kv=self.skip_interval)

    def edit_pass(self, rows: Tuple[str, ...] = CFG_ROWS,
                  kv_into: Optional["AttentionController"] = None) -> AttentionPass:
        return AttentionPass(self, tuple(rows), match=True, concat_kv=self.skip_interval,
                             capture_kv=kv_into is not None, kv_into=kv_into)

    def kv_pass(self, rows: Tuple[str, ...] = ("source",)) -> AttentionPass:
        return AttentionPass(self, tuple(rows), capture_kv=True)

    def plain_pass(self, rows: Tuple[str, ...] = ("cond",)) -> AttentionPass:
        return AttentionPass(self, tuple(rows), concat_kv=self.skip_interval)

    def attend(self, q, k, v, site: AttentionSite, p: AttentionPass) -> torch.Tensor:
        if site.layout is None or q.shape[0] != len(site.layout.rows) * site.rows_per_video:
            raise ValueError(f"{site.path}: the site's batch layout does not describe a batch of {q.shape[0]} rows")
        if site.kind == "spatial":
            return self._spatial(q, k, v, site, p)
        return self._temporal(q, k, v, site, p)

    def _spatial(self, q, k, v, site, p) -> torch.Tensor:
        rows = site.layout.rows
        if p.capture_source and self.settings.match_spatial:  # nothing reads it otherwise (~1 GB a step)
            self.buffer.spatial[site.path] = _rows_of(site, "source", q.detach(), k.detach())
        if not (p.match and self.settings.match_spatial and "cond" in rows):
            return sdpa(q, k, v)
        q_src, k_src = self._kept(self.buffer.spatial, site, "spatial q/k")
        thresholds = threshold_ramp(self.settings.thresholds, site.layout.frames, q.device, self.settings.official_ramp)
        outs, masks = [], []
        for index, role in enumerate(rows):
            rs = site.video_rows(index)
            if role != "cond":
                outs.append(sdpa(q[rs], k[rs], v[rs]))
                continue
            src = _source_video(site, q_src.shape[0], len(masks))
            out, mask = matched_attention(q_src[src], k_src[src], q[rs], k[rs], v[rs], thresholds,
                                          self.settings.chunk_budget, self.settings.use_triton)
            outs.append(out)
            masks.append(mask)
        self._record_masks(site, torch.stack(masks))
        return torch.cat(outs)

    def _temporal(self, q, k, v, site, p) -> torch.Tensor:
        if p.capture_kv:
            # One video per role: clip 0 has a single source (or a single edit under CFG).
            (p.kv_into or self).buffer.clip0_kv[site.path] = {role: tuple(t[0] for t in _rows_of(site, role, k.detach(), v.detach()))
                                               for role in set(site.layout.rows)}
        if p.concat_kv:
            k, v = self._with_clip0_kv(k, v, site)
        use_source = self.settings.match_temporal and self.settings.temporal.uses_source(
            self.step, self.steps, site.downscale, site.path)
        if p.capture_source and use_source:
            q_src, k_src = _rows_of(site, "source", q.detach(), k.detach())
            self.buffer.probs[site.path] = torch.softmax(state_float(q_src) @ state_float(k_src).transpose(-1, -2)
                                                         * q.shape[-1] ** -0.5, dim=-1)
        if not (p.match and use_source and "cond" in site.layout.rows):
            return sdpa(q, k, v)
        probs = self._kept(self.buffer.probs, site, "temporal probabilities")
        outs, used = [], 0
        for index, role in enumerate(site.layout.rows):
            rs = site.video_rows(index)
            if role == "cond":
                src = _source_video(site, probs.shape[0], used)
                outs.append(_apply_probs(probs[src], v[rs], site.path))
                used += 1
            else:
                outs.append(sdpa(q[rs], k[rs], v[rs]))
        self.buffer.temporal_source.add(site.path)
        return torch.cat(outs)

    def _with_clip0_kv(self, k, v, site) -> Tuple[torch.Tensor, torch.Tensor]:
        kept = self.buffer.clip0_kv.get(site.path)
        if not kept:
            raise ValueError(f"{site.path}: no clip-0 K/V for this step: run a kv_pass on clip 0 after "
                             f"begin_step and before this forward (skip-interval)")
        ks, vs = [], []
        for index, role in enumerate(site.layout.rows):
            if role not in kept and len(kept) != 1:
                raise ValueError(f"{site.path}: clip-0 K/V were kept for rows {sorted(kept)}, not {role!r}")
            k0, v0 = kept[role] if role in kept else next(iter(kept.values()))
            rs = site.video_rows(index)
            if k0.shape[0] != k[rs].shape[0] or k0.shape[1] != k.shape[1] or k0.shape[3] != k.shape[3]:
                raise ValueError(f"{site.path}: clip-0 K/V {tuple(k0.shape)} do not fit {tuple(k[rs].shape)}: clip 0 "
                                 f"must have the same latent size as this clip")
            ks.append(torch.cat([k0.to(k.dtype), k[rs]], dim=2))
            vs.append(torch.cat([v0.to(v.dtype), v[rs]], dim=2))
        return torch.cat(ks), torch.cat(vs)

    def _kept(self, store: Dict, site: AttentionSite, what: str):
        if site.path not in store:
            raise ValueError(f"{site.path}: no source {what} for step {self.step}: run the source pass of this "
                             f"step (controller.source_pass()) before the edit pass")
        return store[site.path]

    def _record_masks(self, site: AttentionSite, masks: torch.Tensor) -> None:
        self.buffer.masks[site.path] = masks.view(masks.shape[0], site.layout.frames, site.layout.tokens)
        if site.layout.grid is not None:
            self.maps.add(site.path, site.layout.grid, self.buffer.masks[site.path])


def _rows_of(site: AttentionSite, role: str, *tensors: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """The batch' rows of all videos with `role`, stacked as (videos, rows_per_video, ...)."""
    indices = site.layout.indices(role)
    if not indices:
        raise ValueError(f"{site.path}: the pass expects {role!r} rows, the batch has {site.layout.rows}")
    return tuple(torch.stack([t[site.video_rows(i)] for i in indices]) for t in tensors)


def _source_video(site: AttentionSite, kept_videos: int, cond_index: int) -> int:
    """Several edits may share one source; otherwise edit j is matched against source j."""
    if kept_videos == 1:
        return 0
    if cond_index >= kept_videos:
        raise ValueError(f"{site.path}: more conditional rows than source videos ({kept_videos}) to match against")
    return cond_index


def _apply_probs(probs: torch.Tensor, v: torch.Tensor, path: str) -> torch.Tensor:
    if probs.shape[-1] != v.shape[2]:
        raise ValueError(f"{path}: source temporal attention has {probs.shape[-1]} keys, the edit {v.shape[2]}: "
                         f"use skip-interval in both the source and the edit forward or in neither")
    return (probs.to(v.dtype) @ v)
