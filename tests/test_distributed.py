"""Fan-out over torch.distributed (issue 14): 2 CPU processes with gloo under torchrun, the tiny model.

The jobs run tests/distributed_job.py; each launch takes a few seconds of start-up per process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import distributed_job  # noqa: E402

TIMEOUT_S = 240


def torchrun(*args, cwd=ROOT):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)


def job(tmp_path, mode):
    done = torchrun(ROOT / "tests" / "distributed_job.py", tmp_path, mode)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


def entries(folder: Path):
    return {p.name: load_file(p) for p in sorted(folder.glob("*.safetensors"))}


def test_two_processes_give_the_single_process_loras_and_frames(tmp_path):
    ranks = job(tmp_path / "fan", "edit")
    assert [r["ended"] for r in ranks] == ["ok", "ok"] and [r["edits"] for r in ranks] == [1, 0]
    fanned = torch.load(tmp_path / "fan" / "result.pt", weights_only=True)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks: CPU kernels round differently with another thread count
    try:
        from i2vedit_core.cache import ArtifactCache
        from i2vedit_core.distributed import video_loras
        from i2vedit_core.pipeline import edit_video
        from i2vedit_core.tiny import tiny_backend
        video, edited = distributed_job.inputs()
        backend, cache = tiny_backend(0), ArtifactCache(tmp_path / "single")
        single = edit_video(backend, video, edited, distributed_job.SETTINGS, cache=cache)
        loras = video_loras(backend, video, distributed_job.SETTINGS, cache=cache)
    finally:
        torch.set_num_threads(threads)

    assert torch.equal(fanned["frames"], single.edits[0].frames)
    # The cache keys fingerprint each artifact's inputs (frames, settings, model, clip-0 context):
    # the same names and the same tensors mean the same inversions and motion LoRAs.
    ours, theirs = entries(tmp_path / "single"), entries(tmp_path / "fan" / "cache")
    assert sorted(ours) == sorted(theirs) and sum(n.startswith("lora-") for n in ours) == 3
    for name, tensors in ours.items():
        assert all(torch.equal(tensors[k], theirs[name][k]) for k in tensors), name
    assert len(fanned["loras"]) == 3 and all(
        mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
        for mine, theirs in zip(fanned["loras"], (lora.weights for lora in loras)))
    # rank 0 reported both ranks' training
    trained_by = {e["rank"] for e in fanned["events"] if e["stage"] == "train" and e["step"] > 0}
    assert trained_by == {0, 1}, fanned["events"]
    assert {e["rank"] for e in fanned["events"] if e["stage"] == "edit"} == {0}


@pytest.mark.parametrize("mode, stopper, stopped", [("fail", 1, 0), ("cancel", 0, 1)])
def test_failure_or_cancel_on_one_rank_stops_the_other(tmp_path, mode, stopper, stopped):
    ranks = job(tmp_path, mode)
    cause = ranks[stopper]["ended"]
    assert cause in {"fail": ["RuntimeError"], "cancel": ["Cancelled", "TrainingCancelled"]}[mode], ranks
    assert ranks[stopped]["ended"] == "StoppedByPeer", ranks[stopped]
    assert f"rank {stopper}: {cause}" in ranks[stopped]["message"]
    assert ranks[stopped]["at"] - ranks[stopper]["at"] < 30, "the other rank must stop at its next step"
    cache = tmp_path / "cache"
    assert not list(cache.glob("*.partial"))
    complete = entries(cache)  # every entry left is whole (load_file would fail on a torn one)
    assert sum(n.startswith("lora-") for n in complete) < 3, "the stopped run cannot have trained every clip"


def test_cli_under_torchrun_writes_outputs_once(tmp_path):
    done = torchrun("-m", "i2vedit_core", "--out", tmp_path / "out", "--steps", "2", "--train-steps", "1")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert len(report["clips"]) == 3 and sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "demo_edit.mp4", "demo_edit_difference.png", "report.json"]
    assert done.stdout.count("wrote ") == 1, done.stdout  # rank 0 alone writes


def test_model_identity_is_the_same_in_every_process():
    """Cache keys must agree across ranks: diffusers' `_use_default_values` list comes in set order,
    which changes with each process's hash seed, so config bookkeeping must not enter the identity."""
    from diffusers.configuration_utils import FrozenDict
    from i2vedit_core.tiny import tiny_backend
    backend = tiny_backend(0)
    before = backend.identity()
    config = dict(backend.vae._internal_dict)
    backend.vae._internal_dict = FrozenDict(config, _use_default_values=config["_use_default_values"][::-1],
                                            _name_or_path="/elsewhere")
    assert len(config["_use_default_values"]) >= 2 and backend.identity() == before


def test_motion_loras_command_saves_the_series_load_motion_lora_reads(tmp_path, capsys):
    from i2vedit_core.lora import load_motion_lora
    from i2vedit_core.motion_loras import main
    from i2vedit_core.tiny import synthetic_clip, tiny_clip, tiny_unet, tiny_vae
    from i2vedit_core.video_io import write_video
    svd = tmp_path / "svd"
    tiny_unet(0).save_pretrained(svd / "unet")
    tiny_vae(1).save_pretrained(svd / "vae")
    tiny_clip(2).save_pretrained(svd / "image_encoder")
    video = write_video(tmp_path / "in.mp4", synthetic_clip(10, 64, 64), fps=5)
    argv = ["--svd", str(svd), "--video", str(video), "--save", str(tmp_path / "loras" / "my_video"),
            "--size", "64", "64", "--frames-per-clip", "4", "--steps", "2", "--train-steps", "1", "--dtype", "fp32",
            "--cache", str(tmp_path / "cache")]
    assert main(argv) == 0
    saved = sorted((tmp_path / "loras").iterdir())
    assert [p.name for p in saved] == [f"my_video_clip0{k}of03.safetensors" for k in (1, 2, 3)]
    cached = [w for name, w in entries(tmp_path / "cache").items() if name.startswith("lora-")]
    for path in saved:  # each file is one of the trained LoRAs, in the format the nodes load
        lora = load_motion_lora(str(path))
        assert lora.metadata["source_frames"] == "4"
        assert sum(all(torch.equal(lora.weights[k], w[k]) for k in lora.weights) for w in cached) == 1
    assert main(argv) == 2 and "already exist" in capsys.readouterr().err
