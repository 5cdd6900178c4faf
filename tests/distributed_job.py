"""One rank of tests/test_distributed.py's jobs: `torchrun --standalone --nproc-per-node 2 tests/distributed_job.py
OUT MODE` (gloo, CPU). MODE: "edit" (rank 0 saves the frames and progress events), "fail" (rank 1 raises
during its work), "cancel" (rank 0's cancel fires while rank 1 still works). Every rank writes
rank<r>.json with how its call ended and when; a rank that fails does not exit with an error, so
torchrun does not stop the others: they must stop by themselves."""

import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

torch.set_num_threads(1)  # CPU results depend on the thread count; the reference runs with 1 too

from i2vedit_core.cache import ArtifactCache  # noqa: E402
from i2vedit_core.distributed import video_loras  # noqa: E402
from i2vedit_core.inversion import InversionSettings  # noqa: E402
from i2vedit_core.pipeline import PipelineSettings, edit_video  # noqa: E402
from i2vedit_core.tiny import synthetic_clip, tiny_backend  # noqa: E402
from i2vedit_core.training import TrainingSettings  # noqa: E402

# 10 frames, 4 per clip, overlap 1: three clips, the last two with skip-interval
SETTINGS = PipelineSettings(clip_length=4, overlap=1, working_size=(64, 64), inversion=InversionSettings(steps=2),
                            training=TrainingSettings(steps=2, max_pixels=64 * 64))


def inputs():
    video = synthetic_clip(10, 64, 64)
    edited = video[0].clone()
    edited[:, 8:24, 36:56] = torch.tensor([0.9, 0.1, -0.6]).view(3, 1, 1)
    return video, edited[None]


def failing_after(calls: int, error):
    count = [0]

    def cancel():
        count[0] += 1
        if count[0] > calls:
            if isinstance(error, Exception):
                raise error
            return True
        return False
    return cancel


def main(out: Path, mode: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    video, edited = inputs()
    cancel = None
    if mode == "fail" and rank == 1:
        cancel = failing_after(3, RuntimeError("injected failure"))
    if mode == "cancel" and rank == 0:
        cancel = failing_after(3, True)
    events = []
    record = {"rank": rank}
    try:
        backend, cache = tiny_backend(0), ArtifactCache(out / "cache")
        result = edit_video(backend, video, edited, SETTINGS, progress=events.append, cancel=cancel, cache=cache)
        record.update(ended="ok", edits=len(result.edits))
        # the LoRAs alone, fanned out too (cache hits here: the edit trained them)
        loras = video_loras(backend, video, SETTINGS, cache=cache) if mode == "edit" else None
        if rank == 0:
            torch.save({"frames": result.edits[0].frames, "events": events,
                        "loras": [lora.weights for lora in loras or []]}, out / "result.pt")
    except Exception as error:  # recorded for the test; exiting normally keeps torchrun from stopping the others
        record.update(ended=type(error).__name__, message=str(error))
    record["at"] = time.time()
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
