import pytest
import torch

from i2vedit_core.tiny import synthetic_clip
from i2vedit_core.video_io import read_image, read_video, write_image, write_video


def test_video_round_trip(tmp_path):
    frames = synthetic_clip(5, 64, 96)
    path = write_video(tmp_path / "out" / "clip.mp4", frames, fps=7)
    decoded, fps = read_video(path)
    assert decoded.shape == frames.shape and fps == pytest.approx(7)
    assert (decoded - frames).abs().mean() < 0.03  # lossy codec, high quality
    strided, fps2 = read_video(path, max_frames=2, stride=2)
    assert strided.shape[0] == 2 and fps2 == pytest.approx(3.5)
    assert torch.allclose(strided[1], decoded[2], atol=1e-6)


def test_odd_sizes_are_padded_for_the_codec(tmp_path):
    decoded, _ = read_video(write_video(tmp_path / "odd.mp4", synthetic_clip(2, 63, 65)[..., :63, :65], fps=4))
    assert decoded.shape[-2:] == (64, 66)


def test_image_round_trip_is_exact(tmp_path):
    frame = torch.round((synthetic_clip(1)[0] + 1) * 127.5) / 127.5 - 1
    assert torch.allclose(read_image(write_image(tmp_path / "f.png", frame)), frame, atol=1e-6)


def test_bad_files_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="video not found"):
        read_video(tmp_path / "missing.mp4")
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video at all")
    with pytest.raises(ValueError, match="cannot read .*junk.mp4 as a video"):
        read_video(junk)
    with pytest.raises(ValueError, match="cannot read .*junk.mp4 as an image"):
        read_image(junk)
    one = write_video(tmp_path / "one.mp4", synthetic_clip(1), fps=4)
    with pytest.raises(ValueError, match="at least 2"):
        read_video(one)
