"""Held-out bad-input matrix (issue 11): the CLI and the API refuse bad inputs before any model is used.

Every case asserts: the exit code (CLI) or exception type (API); one line of message naming the fix
in the entry point's own words (the flag, the API field); the time before the error, with the model
loader (CLI) or every backend method (API) never entered; and the sha256 of every file present
before the run unchanged, with nothing new written. docs/RELIABILITY.md lists each case.
Node cases: tests/host/test_reliability_nodes.py.
"""

import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from i2vedit_core import cli
from i2vedit_core.backends import diffusers_loading
from i2vedit_core.inversion import InversionSettings
from i2vedit_core.pipeline import PipelineSettings, edit_video
from i2vedit_core.tiny import synthetic_clip
from i2vedit_core.validation import InvalidInput
from i2vedit_core.video_io import write_image, write_video

SECONDS_BEFORE_ERROR = 10.0  # reading a 7-frame video and a few PNGs (~1 s on a busy 2-core machine)
TIMES = {}                  # case -> seconds from call to error (printed by the last test)
H, W = 64, 96


@pytest.fixture()
def files(tmp_path, svd_folder):
    """A natural layout: the clip, its frame 0 edited next to it, a mask, a tiny diffusers SVD folder."""
    source = synthetic_clip(7, H, W)
    edited = source[0].clone()
    edited[:, 4:20, 4:20] = 0.9
    mask = torch.full((3, H, W), -1.0)
    mask[:, 8:40, 8:40] = 1.0
    return dict(dir=tmp_path, svd=svd_folder, video=write_video(tmp_path / "clip.mp4", source, fps=5),
                edit=write_image(tmp_path / "edit.png", edited), mask=write_image(tmp_path / "mask.png", mask),
                out=tmp_path / "out")


def base(f, *extra):
    return ["--svd", str(f["svd"]), "--video", str(f["video"]), "--edited", str(f["edit"]), "--out", str(f["out"]),
            "--size", "128", "64", "--frames-per-clip", "4", "--steps", "2", "--train-steps", "1", *extra]


def snapshot(folder: Path):
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def image(path, array, mode=None):
    Image.fromarray(array, mode).save(path)
    return path


def _existing_output(f):
    f["out"].mkdir()
    (f["out"] / "edit.mp4").write_bytes(b"an earlier result")
    return base(f)


def _same_names(f):
    (f["dir"] / "b").mkdir()
    other = f["dir"] / "b" / "edit.png"
    other.write_bytes(f["edit"].read_bytes())
    return base(f) + ["--edited", str(f["edit"]), str(other)]


def _broken_config(f, tmp=None):
    copy = f["dir"] / "svd_copy"
    for sub in ("unet", "vae", "image_encoder"):
        (copy / sub).mkdir(parents=True)
        (copy / sub / "config.json").write_text((f["svd"] / sub / "config.json").read_text())
    (copy / "unet" / "config.json").write_text('{"in_channels": 8,, }')
    return base(f) + ["--svd", str(copy)]


def _folder_without_vae(f):
    copy = f["dir"] / "svd_copy"
    for sub in ("unet", "image_encoder"):
        (copy / sub).mkdir(parents=True)
        (copy / sub / "config.json").write_text("{}")
    return base(f) + ["--svd", str(copy)]


def _file(name, data):
    def build(f):
        path = f["dir"] / name
        path.write_bytes(data)
        return path
    return build


def _with(flag, make):
    """base(f) with `flag` given the path `make(f)` builds."""
    return lambda f: base(f) + [flag, str(make(f))]


def _rgba(alpha):
    def build(f):
        rgba = np.zeros((H, W, 4), np.uint8)
        rgba[..., 3] = alpha
        return image(f["dir"] / "rgba.png", rgba, "RGBA")
    return build


def _small_image(f):
    return image(f["dir"] / "small.png", np.zeros((32, 32, 3), np.uint8))


def _one_frame_video(f):
    return write_video(f["dir"] / "one.mp4", synthetic_clip(1, H, W), fps=5)


def _text_file(f):
    path = f["dir"] / "notes.mp4"
    path.write_text("not a video")
    return path


def _mixed_sizes(f):
    return base(f) + ["--edited", str(f["edit"]), str(_small_image(f))]


# case -> (argv builder, exit code, words the one-line message must hold (the flags that fix it))
CLI_CASES = {
    # never write over an input, never replace an output without --overwrite, a bad --out up front
    "out_would_replace_the_input_video": (lambda f: base(f, "--out", str(f["dir"])) + ["--edited", str(
        _file("clip.png", f["edit"].read_bytes())(f))], 2, ["would write clip.mp4 over the input", "--out"]),
    "out_would_replace_the_input_even_with_overwrite": (lambda f: base(f, "--out", str(f["dir"]), "--overwrite") + [
        "--edited", str(_file("clip.png", f["edit"].read_bytes())(f))], 2, ["not even with --overwrite"]),
    "existing_output_without_overwrite": (_existing_output, 2, ["already exists", "--overwrite"]),
    "out_is_a_file": (lambda f: base(f, "--out", str(_file("out.txt", b"x")(f))), 2, ["--out", "is a file"]),
    "out_under_a_file": (lambda f: base(f, "--out", str(_file("plain", b"x")(f) / "out")), 2, ["--out", "is a file"]),
    "two_edits_with_one_name": (_same_names, 2, ["--edited", "would collide", "rename one"]),
    "cache_under_a_file": (lambda f: base(f, "--cache", str(_file("plain", b"x")(f) / "cache")), 2, ["--cache"]),
    # settings (the list), each before the model loads
    "steps_0": (lambda f: base(f, "--steps", "0"), 2, ["--steps", "positive integer"]),
    "train_steps_negative": (lambda f: base(f, "--train-steps", "-3"), 2, ["--train-steps", "--train-steps 0"]),
    "size_7_7": (lambda f: base(f, "--size", "7", "7"), 2, ["--size", "multiples of 64", "--size 1024 576"]),
    "frames_per_clip_1": (lambda f: base(f, "--frames-per-clip", "1"), 2, ["--frames-per-clip", "at least 2"]),
    "overlap_20": (lambda f: base(f, "--overlap", "20"), 2, ["--overlap", "lower the --overlap"]),
    "guidance_nan_nan": (lambda f: base(f, "--guidance", "nan", "nan"), 2,
                         ["2 problems", "--guidance MIN", "--guidance MAX"]),
    "guidance_below_1": (lambda f: base(f, "--guidance", "0.5", "2"), 2, ["--guidance MIN", ">= 1"]),
    "thr_2_2": (lambda f: base(f, "--thr", "2", "2"), 2, ["--thr", "[0, 1]"]),
    "beta_swapped": (lambda f: base(f, "--beta", "0.9", "0.1"), 2, ["--beta", "swap them"]),
    "size_65536_refused_by_the_memory_estimate": (lambda f: base(f, "--size", "65536", "65536"), 2,
                                                  ["--size", "GiB", "a smaller --size"]),
    "three_problems_at_once": (lambda f: base(f, "--steps", "0", "--size", "7", "7", "--thr", "2", "2"), 2,
                               ["3 problems", "--steps", "--size", "--thr"]),
    "stride_0": (lambda f: base(f, "--stride", "0"), 2, ["--stride", "at least 1"]),
    "max_frames_1": (lambda f: base(f, "--max-frames", "1"), 2, ["--max-frames", "at least 2"]),
    "fps_0": (lambda f: base(f, "--fps", "0"), 2, ["--fps", "positive"]),
    "mask_threshold_0": (lambda f: base(f, "--mask", str(f["mask"]), "--mask-threshold", "0"), 2,
                         ["--mask-threshold"]),
    # files: missing, unreadable, wrong kind, wrong size
    "video_missing": (lambda f: base(f, "--video", str(f["dir"] / "nope.mp4")), 2, ["--video", "not found"]),
    "video_not_a_video": (_with("--video", _text_file), 2, ["--video", "convert it to mp4"]),
    "video_of_one_frame": (_with("--video", _one_frame_video), 2, ["--video", "at least 2"]),
    "edited_missing": (lambda f: base(f, "--edited", str(f["dir"] / "nope.png")), 2, ["--edited", "not found"]),
    "edited_not_an_image": (_with("--edited", _file("junk.png", b"\x00junk" * 20)), 2, ["--edited", "use PNG"]),
    "edited_wrong_size": (_with("--edited", _small_image), 2, ["--edited", "32x32", "96x64", "video's own size"]),
    "edited_of_two_sizes": (_mixed_sizes, 2, ["--edited", "mixed sizes"]),
    "edited_transparent": (_with("--edited", _rgba(0)), 2, ["--edited", "transparent", "flatten"]),
    "mask_wrong_size": (_with("--mask", _small_image), 2, ["--mask", "32x32", "video's size"]),
    "mask_not_an_image": (_with("--mask", _file("junk_mask.png", b"GIF89a" + bytes(30))), 2, ["--mask"]),
    "svd_missing": (lambda f: base(f, "--svd", str(f["dir"] / "nope")), 2, ["--svd", "does not exist"]),
    "svd_config_json_broken": (_broken_config, 2, ["--svd", "unet/config.json", "not valid JSON"]),
    "svd_folder_without_vae": (_folder_without_vae, 2, ["--svd", "vae/config.json is missing"]),
    "svd_pickle": (lambda f: base(f, "--svd", str(_file("svd.ckpt", b"\x80\x02}q\x00.")(f))), 2,
                   ["--svd", "convert it to .safetensors"]),
    "svd_truncated_safetensors": (lambda f: base(f, "--svd", str(_file("svd.safetensors", b"\x10\x00")(f))), 2,
                                  ["--svd", "not a readable .safetensors"]),
    # flags that do not go together, typos
    "svd_without_video": (lambda f: ["--svd", str(f["svd"]), "--out", str(f["out"])], 2,
                          ["--svd needs --video and --edited"]),
    "video_without_svd": (lambda f: ["--video", str(f["video"]), "--out", str(f["out"])], 2, ["--video", "--svd"]),
    "flag_typo": (lambda f: base(f, "--stepz", "3"), 2, ["unrecognized arguments: --stepz", "--help"]),
    "not_a_number": (lambda f: base(f, "--steps", "ten"), 2, ["--steps", "invalid int value"]),
    "unknown_preset": (lambda f: base(f, "--preset", "wild"), 2, ["--preset", "invalid choice"]),
    "demo_steps_0": (lambda f: ["--steps", "0", "--out", str(f["out"])], 2, ["--steps"]),
}


class LoaderEntered(AssertionError):
    pass


@pytest.fixture()
def no_model(monkeypatch):
    """Any model construction fails the test: the diffusers loader and the demo's tiny backend."""
    entered = []

    def refuse(*args, **kwargs):
        entered.append(args)
        raise LoaderEntered("a model was loaded before the inputs were checked")
    monkeypatch.setattr(diffusers_loading, "load_svd", refuse)
    monkeypatch.setattr("i2vedit_core.tiny.tiny_backend", refuse)
    return entered


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_cli_refuses_before_loading(case, files, no_model, capsys):
    build, code, words = CLI_CASES[case]
    argv = build(files)
    before = snapshot(files["dir"])
    started = time.perf_counter()
    try:
        result = cli.main(argv)
    except SystemExit as exit_:  # argparse
        result = exit_.code
    TIMES[f"cli:{case}"] = elapsed = time.perf_counter() - started
    err = capsys.readouterr().err.strip()
    assert result == code, err
    assert "\n" not in err and err.startswith("i2vedit: error: "), err
    for word in words:
        assert word in err, f"{word!r} not in: {err}"
    assert not any(api in err for api in ("clip_length", "min_guidance", "working_size", "training=None")), err
    assert no_model == [] and elapsed < SECONDS_BEFORE_ERROR
    assert snapshot(files["dir"]) == before, "an input changed or a file was written"
    assert not files["out"].exists() or case == "existing_output_without_overwrite"


# --- the API: edit_video checks everything before the backend is used -------------------------------------

class Untouchable:
    """A backend whose every method fails the test; only `device` may be read."""
    device = torch.device("cpu")

    def __getattr__(self, name):
        raise AssertionError(f"backend.{name} used before the inputs were checked")


FAST = PipelineSettings(clip_length=3, working_size=(64, 64), inversion=InversionSettings(steps=2), training=None)
VIDEO = synthetic_clip(3, 64, 64, seed=1)


def nan_at(tensor, index):
    out = tensor.clone()
    out[index] = math.nan
    return out


# case -> (kwargs of edit_video, words of the message: the API's field names and the fix)
API_CASES = {
    "mask_wrong_size": (dict(mask=torch.ones(32, 32)), ["mask is 32x32 but the video is 64x64"]),
    "mask_nan": (dict(mask=nan_at(torch.ones(64, 64), (1, 1))), ["mask must hold finite values in [0, 1]"]),
    "mask_negative": (dict(mask=torch.full((64, 64), -0.5)), ["mask must hold finite values"]),
    "mask_per_frame": (dict(mask=torch.ones(3, 64, 64)), ["mask is", "one (H, W) mask"]),
    "edited_wrong_size": (dict(edited_first_frames=torch.zeros(1, 3, 32, 32)),
                          ["edited_first_frames is 32x32", "video's own size"]),
    "edited_nan": (dict(edited_first_frames=nan_at(VIDEO[:1], (0, 0, 2, 2))), ["edited_first_frames", "NaN"]),
    "edited_none_given": (dict(edited_first_frames=[]), ["edited_first_frames", "at least one frame"]),
    "frames_nan": (dict(frames=nan_at(VIDEO, (1, 1, 1, 1))), ["frames", "NaN"]),
    "frames_16_bit_unscaled": (dict(frames=VIDEO.add(1).mul(32767.5)), ["frames", "x * 2 - 1"]),
    "frames_one": (dict(frames=VIDEO[:1]), ["frames", "at least 2 frames"]),
    "working_size_65536_memory": (dict(settings=PipelineSettings(working_size=(65536, 65536), training=None)),
                                  ["working_size", "GiB", "smaller working size"]),
    "two_problems_at_once": (dict(edited_first_frames=torch.zeros(1, 3, 32, 32), mask=torch.ones(32, 32)),
                             ["2 problems", "edited_first_frames", "mask"]),
}


@pytest.mark.parametrize("case", sorted(API_CASES))
def test_api_refuses_before_the_backend_is_used(case, tmp_path):
    kwargs, words = API_CASES[case]
    call = dict(frames=VIDEO, edited_first_frames=VIDEO[:1], settings=FAST) | kwargs
    inputs = {k: v.clone() for k, v in call.items() if isinstance(v, torch.Tensor)}
    cache_file = tmp_path / "keep.safetensors"
    cache_file.write_bytes(b"user data")
    before = snapshot(tmp_path)
    started = time.perf_counter()
    with pytest.raises(Exception) as caught:
        edit_video(Untouchable(), **call)
    TIMES[f"api:{case}"] = time.perf_counter() - started
    assert type(caught.value) is InvalidInput, f"{type(caught.value).__name__}: {caught.value}"
    message = str(caught.value)
    assert "\n" not in message and all(word in message for word in words), message
    assert time.perf_counter() - started < SECONDS_BEFORE_ERROR
    assert all(torch.equal(call[k], v) for k, v in inputs.items() if not v.isnan().any()), "an input was modified"
    assert snapshot(tmp_path) == before


def test_matrix_size_and_times(capsys):
    """At least 40 cases; the slowest time before an error is printed for docs/RELIABILITY.md."""
    assert len(CLI_CASES) + len(API_CASES) >= 40
    if TIMES:
        slowest = max(TIMES, key=TIMES.get)
        with capsys.disabled():
            print(f"\n{len(TIMES)} bad-input cases; slowest to its error: {slowest} {TIMES[slowest]:.2f} s")
    json.dumps(TIMES)
