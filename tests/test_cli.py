import json

import pytest
import torch

from i2vedit_core.cli import main
from i2vedit_core.tiny import synthetic_clip, tiny_clip, tiny_unet, tiny_vae
from i2vedit_core.video_io import read_video, write_image, write_video


def test_demo_writes_video_map_and_report(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--steps", "3", "--train-steps", "2"]) == 0
    said = capsys.readouterr().out
    assert "RANDOM-WEIGHT" in said and "NOT an edit" in said
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["demo"] is True and "plumbing" in report["note"]
    frames, _ = read_video(tmp_path / "demo_edit.mp4")
    assert frames.shape == (12, 3, 64, 64)
    assert (tmp_path / "demo_edit_difference.png").is_file()
    metrics = report["edits"]["demo_edit"]["metrics"]
    assert set(metrics) >= {"warp_error", "flicker", "psnr_unedited", "first_frame_psnr", "seam_colour_drift"}


def test_real_path_with_a_diffusers_folder(tmp_path):
    svd = tmp_path / "svd"
    tiny_unet(0).save_pretrained(svd / "unet")
    tiny_vae(1).save_pretrained(svd / "vae")
    tiny_clip(2).save_pretrained(svd / "image_encoder")
    source = synthetic_clip(7, 64, 96)
    video = write_video(tmp_path / "in.mp4", source, fps=5)
    edited = source[0].clone()
    edited[:, 4:20, 4:20] = 0.9
    image = write_image(tmp_path / "edit.png", edited)
    mask = write_image(tmp_path / "mask.png", torch.ones(3, 64, 96))
    out = tmp_path / "out"
    code = main(["--svd", str(svd), "--video", str(video), "--edited", str(image), "--mask", str(mask),
                 "--out", str(out), "--size", "128", "64", "--frames-per-clip", "4", "--steps", "2",
                 "--train-steps", "1", "--dtype", "fp32", "--cache", str(tmp_path / "cache")])
    assert code == 0
    frames, fps = read_video(out / "edit.mp4")
    assert frames.shape == (7, 3, 64, 96) and fps == pytest.approx(5)
    report = json.loads((out / "report.json").read_text())
    assert report["demo"] is False and report["clips"] == [[0, 4], [3, 7]]
    assert list((tmp_path / "cache").glob("inversion-*.safetensors"))


@pytest.mark.parametrize("argv,message", [
    (["--svd", "x"], "needs --video and --edited"),
    (["--svd", "/nonexistent/svd.safetensors", "--video", "/nonexistent.mp4", "--edited", "e.png"], "video not found"),
])
def test_bad_arguments_exit_2_with_a_message(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


# --- the CLI as people expect (issue 11) -------------------------------------------------------------------

import os
import subprocess
import sys
from pathlib import Path

from i2vedit_core import cli
from i2vedit_core.backends import diffusers_loading

REPO = Path(__file__).resolve().parents[1]


def test_help_has_the_whole_description_every_flag_explained_and_defaults(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "Exit codes: 0 done, 2 bad input or setting, 130 interrupted (Ctrl-C)." in text  # the last line
    assert "(default: 25)" in text and "(default: i2vedit_output)" in text and "(default: auto)" in text
    parser = cli.build_parser()
    assert all(action.help for action in parser._actions), [a.dest for a in parser._actions if not a.help]


def test_dtype_auto_is_fp32_on_cpu(tmp_path, monkeypatch):
    seen = {}

    def fake_load(path, dtype, device):
        seen.update(dtype=dtype, device=device)
        raise KeyboardInterrupt  # stop here: the test is about what is asked for

    monkeypatch.setattr(diffusers_loading, "load_svd", fake_load)
    monkeypatch.setattr(cli, "device_of", lambda: "cpu")
    files = _files(tmp_path)
    assert main(files["argv"]) == 130
    assert seen == {"dtype": torch.float32, "device": "cpu"}


def test_progress_line_has_elapsed_time_and_eta():
    import io
    now = [100.0]
    stream = io.StringIO()
    line = cli.ProgressLine(stream, clock=lambda: now[0])
    line(dict(stage="invert", clip=0, clips=2, step=0, total=4))
    now[0] = 104.0
    line(dict(stage="invert", clip=0, clips=2, step=2, total=4))  # 2 s a step, 6 steps left in the stage
    text = stream.getvalue()
    assert "2/4" in text and "elapsed 0:04" in text and "ETA 0:12" in text


def _files(tmp_path, mask=None):
    svd = tmp_path / "svd"
    for sub in ("unet", "vae", "image_encoder"):  # configs only: the loader is replaced in these tests
        (svd / sub).mkdir(parents=True)
        (svd / sub / "config.json").write_text("{}")
    source = synthetic_clip(5, 64, 64)
    video = write_video(tmp_path / "in.mp4", source, fps=5)
    image = write_image(tmp_path / "edit.png", source[0])
    argv = ["--svd", str(svd), "--video", str(video), "--edited", str(image), "--out", str(tmp_path / "out"),
            "--size", "64", "64", "--frames-per-clip", "3", "--steps", "2", "--train-steps", "1"]
    if mask is not None:
        argv += ["--mask", str(write_image(tmp_path / "mask.png", mask))]
    return dict(argv=argv, source=source, video=video)


class NoModel:
    device = torch.device("cpu")


def test_ctrl_c_is_one_line_exit_130_and_writes_nothing(tmp_path, monkeypatch, capsys):
    import i2vedit_core.pipeline as pipeline

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(diffusers_loading, "load_svd", lambda *a, **k: NoModel())
    monkeypatch.setattr(pipeline, "edit_video", interrupted)
    assert main(_files(tmp_path)["argv"]) == 130
    assert capsys.readouterr().err.strip() == "i2vedit: interrupted; no output was written"
    assert not (tmp_path / "out").exists()


def test_all_black_mask_returns_the_source_without_training_and_says_so(tmp_path, monkeypatch, capsys):
    """The mask promise through the CLI: nothing may change, so nothing is computed and the source is written."""
    import i2vedit_core.pipeline as pipeline

    def never(*args, **kwargs):
        raise AssertionError("inverted, trained or edited under an all-black mask")
    for name in ("invert_video", "train_loras", "propagate"):
        monkeypatch.setattr(pipeline, name, never)
    monkeypatch.setattr(diffusers_loading, "load_svd", lambda *a, **k: NoModel())
    files = _files(tmp_path, mask=torch.full((3, 64, 64), -1.0))
    old = os.umask(0o027)
    try:
        assert main(files["argv"]) == 0
    finally:
        os.umask(old)
    assert "the mask is all black, so nothing may change: returned the source unchanged" in capsys.readouterr().out
    written, _ = read_video(tmp_path / "out" / "edit.mp4")
    source, _ = read_video(files["video"])
    assert (written - source).abs().mean() < 0.02  # only the codec's re-encoding differs
    for path in (tmp_path / "out").iterdir():
        assert path.stat().st_mode & 0o777 == 0o640, f"{path.name}: {oct(path.stat().st_mode)} (umask 027)"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["edit.mp4", "edit_difference.png", "report.json"]


def test_a_failed_write_leaves_no_output_and_keeps_the_old_one(tmp_path, monkeypatch, capsys):
    import i2vedit_core.video_io as video_io

    monkeypatch.setattr(diffusers_loading, "load_svd", lambda *a, **k: NoModel())
    files = _files(tmp_path, mask=torch.full((3, 64, 64), -1.0))  # the cheap all-black path
    out = tmp_path / "out"
    out.mkdir()
    (out / "edit.mp4").write_bytes(b"the earlier result")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(video_io, "write_image", disk_full)  # after the video was staged
    assert main(files["argv"] + ["--overwrite"]) == 1
    assert "could not write to --out" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["edit.mp4"]
    assert (out / "edit.mp4").read_bytes() == b"the earlier result"


def test_default_output_folder_is_git_ignored():
    assert cli.build_parser().get_default("out") == "i2vedit_output"
    ignored = subprocess.run(["git", "check-ignore", "-q", "i2vedit_output/x.mp4"], cwd=REPO)
    assert ignored.returncode == 0


def test_settings_typo_fails_fast_in_a_fresh_process(tmp_path):
    """From command to the first error, as a user types it (Python and torch start-up included)."""
    import time
    files = _files(tmp_path)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "i2vedit_core", *files["argv"], "--steps", "0"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - started
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "--steps" in done.stderr, done.stderr
    assert "loading" not in done.stdout
    print(f"\nsettings typo: first error after {seconds:.2f} s")


def test_cache_entries_are_created_with_the_umask(tmp_path):
    from i2vedit_core.cache import ArtifactCache

    old = os.umask(0o027)
    try:
        ArtifactCache(tmp_path).put("entry", {"x": torch.zeros(2)})
    finally:
        os.umask(old)
    assert [(p.name, p.stat().st_mode & 0o777) for p in tmp_path.iterdir()] == [("entry.safetensors", 0o640)]


def test_cli_compile_training_flag():
    """--compile-training asks for the compiled step, --no-compile-training for the eager one; without
    either the memory plan decides (None)."""
    from i2vedit_core.cli import build_parser, settings_from

    on = settings_from(build_parser().parse_args(["--compile-training"]))
    assert on.training.compile is True
    assert settings_from(build_parser().parse_args(["--no-compile-training"])).training.compile is False
    assert settings_from(build_parser().parse_args([])).training.compile is None


def test_cli_cuda_graph_flag():
    """The captured training step is on by default; --no-cuda-graph asks for eager steps."""
    from i2vedit_core.cli import build_parser, settings_from

    assert settings_from(build_parser().parse_args([])).training.cuda_graph is True
    assert settings_from(build_parser().parse_args(["--no-cuda-graph"])).training.cuda_graph is False
