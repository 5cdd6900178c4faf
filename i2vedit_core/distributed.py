"""Several GPUs (or CPU processes) on one video: per-clip inversion and motion-LoRA training fanned out
with torch.distributed, matched editing on rank 0.

`pipeline.edit_video` comes here when the default process group has more than one process
(`torchrun --nproc-per-node N -m i2vedit_core ...`, or any program that called
`torch.distributed.init_process_group`); without one the single-process path runs, unchanged.

- Every rank claims clips one at a time from a counter in the group's store, inverts and trains
  them (a rank that finishes early takes the next clip). A rank with a clip k >= 1 inverts source
  clip 0 itself for skip-interval. Seeds are settings, the same for every clip on every rank, so
  the result does not depend on which rank did what: it equals the single-process run.
- Control (claims, progress, stop) goes through the store; the artifacts go to rank 0 over the
  process group (NCCL on GPUs, gloo on CPU) as safetensors bytes, once every rank has finished.
  Rank 0 then runs the sequential editing; the other ranks wait for it and return no edits.
- Rank 0's progress callback receives every rank's events (each with a "rank" key).
- Any exception on any rank (a failure, the host's cancel) writes a stop note to the store, and
  every other rank raises `StoppedByPeer` at its next step or wait: no rank waits in a collective
  for a rank that has gone, and cache writes stay atomic (no partial entry). A rank killed outright
  writes no note; torchrun then stops the others (SIGTERM, which the CLI turns into a clean exit).
"""

import json
import os
import signal
import time
from contextlib import contextmanager, suppress
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from safetensors.torch import load as load_tensors, save as save_tensors

from .cache import ArtifactCache, fingerprint
from .lora import MotionLora
from .pipeline import (Cancelled, PipelineResult, PipelineSettings, check_edited_frames, invert_video, latent_mask,
                       memory_plan, prepare_video, propagate, train_loras, with_plan)
from .stages import _inversion_from_tensors, _inversion_tensors, _lora_from_entry

POLL_S = 0.05      # store polling while a rank waits for others
RELAY_S = 0.5      # rank 0 forwards the other ranks' progress at most this often while it works itself


class StoppedByPeer(Cancelled):
    """Another rank failed or was cancelled; this rank stopped at its next step."""


def fanned_out() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank in the default process group; 0 without one."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def edit_video(backend, frames, edited_first_frames, settings: PipelineSettings = PipelineSettings(),
               progress=None, cancel=None, cache: Optional[ArtifactCache] = None, mask=None) -> PipelineResult:
    """`pipeline.edit_video` on every rank of the default process group. Rank 0 returns the edits;
    the other ranks return a result with no edits (same clips and timings keys)."""
    settings = with_plan(settings, memory_plan(backend, settings))
    video = prepare_video(frames, settings)
    edits = check_edited_frames(edited_first_frames, video.fit)
    mask = latent_mask(mask, video) if mask is not None else None
    fan = Fan.open()
    with fan.stop_all_on_error():
        fan.check_same_input(video.source, edits, settings)
        started = time.perf_counter()
        artifacts = _fan_out(fan, backend, video, settings, progress, cancel, cache, invert=True)
        timings = {"invert_and_train": time.perf_counter() - started}
        results = []
        if fan.rank == 0:
            inversions, loras = artifacts
            results = propagate(backend, video, inversions, loras, edits, settings, fan.progress(progress),
                                fan.cancel(cancel), timings, mask)
        fan.finish(cancel)
    return PipelineResult(results, timings, video.clips)


def video_loras(backend, frames, settings: PipelineSettings = PipelineSettings(), progress=None, cancel=None,
                cache: Optional[ArtifactCache] = None) -> Optional[List[MotionLora]]:
    """Every clip's motion LoRA (`pipeline.train_loras`, what the Train Motion LoRA node runs), fanned out
    when a process group of several processes is up: rank 0 gets the list, the other ranks None."""
    settings = with_plan(settings, memory_plan(backend, settings))
    if settings.training is None:
        raise ValueError("no training settings: give PipelineSettings(training=TrainingSettings(...))")
    video = prepare_video(frames, settings)
    if not fanned_out():
        return train_loras(backend, video, settings, progress, cancel, cache)
    fan = Fan.open()
    with fan.stop_all_on_error():
        fan.check_same_input(video.source, settings)
        artifacts = _fan_out(fan, backend, video, settings, progress, cancel, cache, invert=False)
        fan.finish(cancel)
    return None if artifacts is None else artifacts[1]


def _fan_out(fan: "Fan", backend, video, settings: PipelineSettings, progress, cancel,
             cache: Optional[ArtifactCache], invert: bool):
    """Every clip's inversion (if `invert`) and motion LoRA (if training is on), computed by all ranks
    together. Rank 0 gets (inversions or None, loras or None) in clip order; the other ranks get None."""
    report, check = fan.progress(progress), fan.cancel(cancel)
    # clip 0's inversions (for skip-interval) are then computed once per rank, not once per claimed clip
    cache = cache if cache is not None else ArtifactCache(max_in_memory=8)
    mine: Dict[int, Tuple] = {}
    for k in iter(lambda: fan.claim(len(video.clips)), None):
        inversion = invert_video(backend, video, settings, report, check, cache, only=[k])[0] if invert else None
        lora = (train_loras(backend, video, settings, report, check, cache, only=[k])[0]
                if settings.training is not None else None)
        mine[k] = (inversion, lora)
    fan.barrier("produced", cancel, progress)
    return fan.gather(mine, len(video.clips), backend.device)


class Fan:
    """One fanned-out call: this rank, the group's store under a prefix of its own, the transfers."""

    def __init__(self, store, rank: int, size: int):
        self.store, self.rank, self.size = store, rank, size
        self._relayed: Dict[int, bytes] = {}
        self._last_relay = 0.0

    @classmethod
    def open(cls) -> "Fan":
        if not fanned_out():
            raise RuntimeError("no process group of several processes: launch with torchrun (or call "
                               "torch.distributed.init_process_group) before fanning out")
        store = dist.distributed_c10d._get_default_store()  # the group's own rendezvous store
        rank = dist.get_rank()
        # every rank makes the same calls in the same order, so its own call count names this call
        call = store.add(f"i2vedit/calls/{rank}", 1)
        return cls(dist.PrefixStore(f"i2vedit/{call}/", store), rank, dist.get_world_size())

    # --- control -------------------------------------------------------------------------------

    @contextmanager
    def stop_all_on_error(self):
        """Any exception here (a failure, a cancel, Ctrl-C) leaves a stop note for the other ranks."""
        try:
            yield self
        except BaseException as error:
            if not isinstance(error, StoppedByPeer):
                with suppress(dist.DistError):  # the store may be what failed: keep the first error
                    self.store.compare_set("stop", "", f"rank {self.rank}: {type(error).__name__}: {error}")
            raise

    def raise_if_stopped(self) -> None:
        if self.store.check(["stop"]):
            raise StoppedByPeer(f"stopped because {self.store.get('stop').decode()}")

    def cancel(self, user_cancel: Optional[Callable[[], bool]]) -> Callable[[], bool]:
        """The cancel check the stages call at every step: another rank's stop raises StoppedByPeer."""
        def check() -> bool:
            self.raise_if_stopped()
            return user_cancel is not None and bool(user_cancel())
        return check

    def progress(self, user_progress):
        """Rank 0: the host's callback, fed this rank's events and (every RELAY_S) the others'.
        Other ranks: their latest event goes to the store for rank 0."""
        def report(event: dict) -> None:
            event = dict(event, rank=self.rank)
            if self.rank != 0:
                self.store.set(f"progress/{self.rank}", json.dumps(event))
                return
            if user_progress is not None:
                user_progress(event)
            if time.perf_counter() - self._last_relay >= RELAY_S:
                self.relay(user_progress)
        return report

    def relay(self, user_progress) -> None:
        self._last_relay = time.perf_counter()
        if user_progress is None:
            return
        for rank in range(1, self.size):
            key = f"progress/{rank}"
            if self.store.check([key]):
                value = self.store.get(key)
                if value != self._relayed.get(rank):
                    self._relayed[rank] = value
                    user_progress(json.loads(value))

    def wait_until(self, done: Callable[[], bool], user_cancel, progress=None) -> None:
        """Poll the store until done(); meanwhile stop on any rank's stop note or this rank's cancel."""
        while not done():
            self.raise_if_stopped()
            if user_cancel is not None and user_cancel():
                raise Cancelled(f"cancelled on rank {self.rank} while waiting for the other ranks")
            if self.rank == 0:
                self.relay(progress)
            time.sleep(POLL_S)

    def barrier(self, name: str, user_cancel=None, progress=None) -> None:
        arrived = self.store.add(f"{name}/arrived", 1)
        self.wait_until(lambda: arrived >= self.size or self.store.add(f"{name}/arrived", 0) >= self.size,
                        user_cancel, progress)

    def claim(self, count: int) -> Optional[int]:
        """The next unclaimed clip, or None when every clip is taken."""
        self.raise_if_stopped()
        k = self.store.add("next", 1) - 1
        if k >= count:
            return None
        self.store.set(f"owner/{k}", str(self.rank))
        return k

    def check_same_input(self, *parts) -> None:
        """Every rank must edit the same frames with the same settings; say so at once if not."""
        mine = fingerprint(*parts)
        self.store.set(f"input/{self.rank}", mine)
        self.barrier("input")
        reference = self.store.get("input/0").decode()
        if mine != reference:
            raise ValueError(f"rank {self.rank} got other frames, edited frames or settings than rank 0: "
                             "give every rank the same inputs")

    def finish(self, user_cancel) -> None:
        """Rank 0 says the call is over and returns once every other rank has seen that (the store
        may live in rank 0's process); the others wait for it, or for a stop."""
        if self.rank == 0:
            self.store.set("finished", "1")
            self.wait_until(lambda: self.store.add("finished/seen", 0) >= self.size - 1, user_cancel)
        else:
            self.wait_until(lambda: self.store.check(["finished"]), user_cancel)
            self.store.add("finished/seen", 1)

    # --- artifacts to rank 0 -------------------------------------------------------------------

    def gather(self, mine: Dict[int, Tuple], count: int, device):
        """Rank 0: (inversions, loras) in clip order (each None when not computed), its own plus the others'
        received in clip order; every other rank sends its clips in clip order (so each pair's sends and
        receives match)."""
        owners = [int(self.store.get(f"owner/{k}")) for k in range(count)]
        link = _link_device()
        if self.rank != 0:
            for k in sorted(mine):
                _send_bytes(_pack(*mine[k]), 0, link)
            return None
        received = {k: _unpack(_recv_bytes(owners[k], link), device, owners[k])
                    for k in range(count) if owners[k] != 0}
        clips = [mine[k] if k in mine else received[k] for k in range(count)]
        inversions, loras = [inversion for inversion, _ in clips], [lora for _, lora in clips]
        return None if inversions[0] is None else inversions, None if loras[0] is None else loras


def _pack(inversion, lora) -> bytes:
    tensors, metadata = {}, {}
    if inversion is not None:
        tensors.update({f"inversion.{k}": v.detach().cpu().contiguous()
                        for k, v in _inversion_tensors(inversion).items()})
    if lora is not None:
        tensors.update({f"lora.{k}": v.contiguous() for k, v in lora.weights.items()})
        metadata = dict(lora.metadata, spec=json.dumps([lora.spec.rank, lora.spec.attn1_only, lora.spec.dropout]))
    return save_tensors(tensors, metadata)


def _unpack(data: bytes, device, rank: int):
    tensors = load_tensors(data)
    inverted = {k[len("inversion."):]: v for k, v in tensors.items() if k.startswith("inversion.")}
    inversion = _inversion_from_tensors(inverted, device) if inverted else None
    weights = {k[len("lora."):]: v for k, v in tensors.items() if k.startswith("lora.")}
    if not weights:
        return inversion, None
    lora = _lora_from_entry(weights, _metadata(data))
    lora.source = f"<trained on rank {rank}>"
    return inversion, lora


def _metadata(data: bytes) -> Dict[str, str]:
    """The string metadata of safetensors bytes (an 8-byte length, then the JSON header)."""
    size = int.from_bytes(data[:8], "little")
    return dict(json.loads(data[8:8 + size]).get("__metadata__", {}))


def _link_device() -> torch.device:
    """NCCL moves CUDA tensors only; gloo moves CPU tensors."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _send_bytes(data: bytes, dst: int, device) -> None:
    payload = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    dist.send(torch.tensor([payload.numel()], dtype=torch.int64, device=device), dst)
    dist.send(payload.to(device), dst)


def _recv_bytes(src: int, device) -> bytes:
    size = torch.zeros(1, dtype=torch.int64, device=device)
    dist.recv(size, src)
    payload = torch.empty(int(size), dtype=torch.uint8, device=device)
    dist.recv(payload, src)
    return payload.cpu().numpy().tobytes()


# --- launch under torchrun ------------------------------------------------------------------------

def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"))


def run_under_torchrun(main: Callable[[], int]) -> int:
    """Run a command-line main in this torchrun worker: one process per GPU (NCCL) or CPU processes (gloo)."""
    if not launched_by_torchrun():
        return main()
    # torchrun stops the other workers with SIGTERM when one dies: exit through Python so that
    # cache writes in progress remove their temporary file.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    local_rank, local_size = int(os.environ["LOCAL_RANK"]), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if torch.cuda.is_available():
        if torch.cuda.device_count() < local_size:
            raise SystemExit(f"i2vedit: torchrun started {local_size} processes on this machine but it has "
                             f"{torch.cuda.device_count()} GPUs: use --nproc-per-node {torch.cuda.device_count()}")
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    else:
        dist.init_process_group("gloo")
    try:
        return main()
    finally:
        dist.destroy_process_group()


def _exit_cleanly(number, frame):
    raise SystemExit(128 + number)
