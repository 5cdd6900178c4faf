import pytest
import torch

from i2vedit_core.clips import new_frames, split_clips
from i2vedit_core.frames import as_frame_batch


@pytest.mark.parametrize("num_frames,length,overlap,expected", [
    (20, 6, 1, [(0, 6), (5, 11), (10, 16), (15, 20)]),
    (14, 14, 1, [(0, 14)]),
    (15, 14, 1, [(0, 14), (13, 15)]),
    (16, 6, 1, [(0, 6), (5, 11), (10, 16)]),  # a clip of only the overlap frame is dropped
    (13, 6, 0, [(0, 6), (6, 12), (11, 13)]),  # a 1-frame tail starts one frame earlier
    (2, 14, 1, [(0, 2)]),
    (30, 14, 2, [(0, 14), (12, 26), (24, 30)]),
])
def test_split_clips(num_frames, length, overlap, expected):
    clips = split_clips(num_frames, length, overlap)
    assert [(c.start, c.stop) for c in clips] == expected
    assert all(len(c) >= 2 for c in clips)
    written = [f for r in new_frames(clips) for f in r]
    assert written == list(range(num_frames)), "every frame written exactly once, in order"


@pytest.mark.parametrize("args,match", [((1, 14, 1), "at least 2 frames"), ((20, 1, 0), "clip_length"),
                                        ((20, 6, 6), "overlap"), ((20, 6, -1), "overlap")])
def test_split_clips_rejects_bad_settings(args, match):
    with pytest.raises(ValueError, match=match):
        split_clips(*args)


def test_frames_accepts_tensor_and_list():
    frames = torch.zeros(3, 3, 64, 128)
    assert as_frame_batch(frames).shape == (3, 3, 64, 128)
    assert torch.equal(as_frame_batch(list(frames)), frames)


@pytest.mark.parametrize("frames,match", [
    (torch.zeros(2, 3, 60, 64), "multiples of 64"),
    (torch.zeros(2, 3, 64, 100), "multiples of 64"),
    ([], "empty"),
    ([torch.zeros(3, 64, 64), torch.zeros(3, 128, 64)], "mixed sizes"),
    (torch.full((2, 3, 64, 64), float("nan")), "NaN"),
    (torch.full((2, 3, 64, 64), 2.0), r"\[-1, 1\]"),
    (torch.zeros(2, 64, 64, 3), r"\(T, 3, H, W\)"),
    ("video.mp4", "tensor"),
])
def test_frames_bad_input_names_the_fix(frames, match):
    with pytest.raises(ValueError, match=match):
        as_frame_batch(frames)


def test_frames_min_count():
    with pytest.raises(ValueError, match="at least 2 frames"):
        as_frame_batch(torch.zeros(1, 3, 64, 64), min_frames=2)
