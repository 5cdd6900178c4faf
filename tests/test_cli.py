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
