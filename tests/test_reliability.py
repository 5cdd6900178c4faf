"""Reliability and security (issue 7, core tier): bad inputs, injected OOM, cancel, determinism, no pickle/network.

Every bad input must fail with the exact exception type and a message naming the fix, before it reaches
torch internals; the documented "works" cases must work. docs/RELIABILITY.md maps each guarantee to the
test here (or in tests/host/test_reliability_nodes.py) that proves it.
"""

import ast
import json
from dataclasses import replace
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from i2vedit_core import pipeline as pipeline_module
from i2vedit_core import training as training_module
from i2vedit_core.attention import MatchSettings, TemporalSelector
from i2vedit_core.backends import diffusers_lora
from i2vedit_core.backends.diffusers_loading import load_svd
from i2vedit_core.cache import ArtifactCache
from i2vedit_core.editing import EditSettings
from i2vedit_core.inversion import InversionSettings, invert_clip
from i2vedit_core.lora import LoraSpec, load_motion_lora, motion_lora_from_pairs, save_motion_lora
from i2vedit_core.pipeline import (Cancelled, OutOfMemory, PipelineSettings, edit_video, invert_video,
                                   prepare_video, propagate)
from i2vedit_core.tiny import synthetic_clip, tiny_backend
from i2vedit_core.training import TrainingCancelled, TrainingSettings, train_motion_lora
from i2vedit_core.validation import InvalidInput

REPO = Path(__file__).resolve().parents[1]
FAST = PipelineSettings(clip_length=3, overlap=1, working_size=(64, 64), inversion=InversionSettings(steps=2),
                        training=None)
TRAINED = PipelineSettings(clip_length=3, overlap=1, working_size=(64, 64), inversion=InversionSettings(steps=2),
                           training=TrainingSettings(steps=2, lora=LoraSpec(rank=2)))


@pytest.fixture(scope="module")
def video():
    return synthetic_clip(3, 64, 64, seed=1)


def edited(video):
    frame = video[0].clone()
    frame[:, 8:24, 36:56] = torch.tensor([0.9, 0.1, -0.6]).view(3, 1, 1)
    return frame[None]


def with_value(tensor, index, value):
    out = tensor.clone()
    out[index] = value
    return out


def random_lora(backend, rank=2, metadata=None, widen=0):
    """A motion LoRA with random weights on this backend's target Linears (widen: fake another model's widths)."""
    spec = LoraSpec(rank=rank)
    g = torch.Generator().manual_seed(0)
    pairs = {path: (torch.randn(rank, inp + widen, generator=g), torch.randn(out, rank, generator=g))
             for path, (out, inp) in diffusers_lora.module_shapes(backend.unet, spec).items()}
    return motion_lora_from_pairs(pairs, spec, metadata)


# --- the bad-input matrix: (what to call, exact exception type, regex the message must match) -------------
# Each entry is a function of (backend, video, tmp_path). Messages are matched on the part naming the fix.

def _edit(settings=FAST, frames=None, edit=None, **kwargs):
    def call(backend, video, tmp_path):
        return edit_video(backend, video if frames is None else frames, edited(video) if edit is None else edit,
                          settings, **kwargs)
    return call


def _lora_file(write, suffix=".safetensors"):
    def call(backend, video, tmp_path):
        path = tmp_path / f"motion{suffix}"
        write(backend, path)
        return load_motion_lora(str(path))
    return call


def _write_bytes(data):
    return lambda backend, path: path.write_bytes(data)


def _truncated(backend, path):
    save_motion_lora(random_lora(backend), str(path))
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _corrupt(backend, path):
    save_motion_lora(random_lora(backend), str(path))
    data = bytearray(path.read_bytes())
    data[8:40] = b"{not json at all" * 2  # the safetensors header
    path.write_bytes(bytes(data))


class NotATensor:
    """Pickled by torch.save below: loading it needs code execution, which weights-only loading refuses."""


def _torch_pickle(zip_format):
    def write(backend, path):
        torch.save([torch.zeros(2), NotATensor()], str(path), _use_new_zipfile_serialization=zip_format)
    return write


def _sd15_lora(backend, path):  # kohya-style keys of an image LoRA: another model, another tool
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 4)}, str(path))


def _nan_lora(backend, path):
    lora = random_lora(backend)
    key = next(k for k in lora.weights if k.endswith("lora_up.weight"))
    save_file({k: with_value(v, 0, float("nan")) if k == key else v for k, v in lora.weights.items()}, str(path))


def _sd15_checkpoint(backend, video, tmp_path):
    path = tmp_path / "sd15.safetensors"
    save_file({"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": torch.zeros(8, 8),
               "first_stage_model.encoder.conv_in.weight": torch.zeros(8, 3, 3, 3)}, str(path))
    return load_svd(path, dtype=torch.float32, device="cpu")


def _pickle_checkpoint(backend, video, tmp_path):
    path = tmp_path / "svd.ckpt"
    path.write_bytes(b"\x80\x02}q\x00.")
    return load_svd(path, dtype=torch.float32, device="cpu")


def _image_model_folder(backend, video, tmp_path):
    for sub, name in (("unet", "UNet2DConditionModel"), ("vae", "AutoencoderKL"),
                      ("image_encoder", "CLIPVisionModelWithProjection")):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "config.json").write_text(json.dumps({"_class_name": name}))
    return load_svd(tmp_path, dtype=torch.float32, device="cpu")


def _propagate_with(loras):
    def call(backend, video, tmp_path):
        prepared = prepare_video(video, FAST)
        inversions = invert_video(backend, prepared, FAST)
        return propagate(backend, prepared, inversions, loras(backend), edited(video), FAST)
    return call


def _cache_in_a_file(backend, video, tmp_path):
    (tmp_path / "file").write_text("")
    return ArtifactCache(tmp_path / "file" / "cache")


def _cache_unwritable(monkeypatch_target="tempfile.NamedTemporaryFile"):
    def call(backend, video, tmp_path):
        import i2vedit_core.cache as cache_module

        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied")
        original = cache_module.tempfile.NamedTemporaryFile
        cache_module.tempfile.NamedTemporaryFile = refuse
        try:
            return ArtifactCache(tmp_path / "cache")
        finally:
            cache_module.tempfile.NamedTemporaryFile = original
    return call


def _cache_full(backend, video, tmp_path):
    import i2vedit_core.cache as cache_module

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    cache = ArtifactCache(tmp_path / "cache")
    original, cache_module.save_file = cache_module.save_file, full
    try:
        return edit_video(backend, video, edited(video), FAST, cache=cache)
    finally:
        cache_module.save_file = original


NAN, INF = float("nan"), float("inf")
MULTIPLE_OF_64 = "multiples of 64: resize or pad them first"

BAD_INPUTS = {
    # frames
    "mixed_frame_sizes": (_edit(frames=[torch.zeros(3, 64, 64), torch.zeros(3, 64, 128)]), InvalidInput,
                          "mixed sizes .* resize them all to one size first"),
    "channels_last_frames": (_edit(frames=torch.zeros(3, 64, 64, 3)), InvalidInput, r"\(T, 3, H, W\)"),
    "frames_in_0_255": (_edit(frames=torch.full((3, 3, 64, 64), 200.0)), InvalidInput, r"convert .* x \* 2 - 1"),
    "frames_not_64_inversion": (lambda b, v, t: invert_clip(b, synthetic_clip(3, 60, 100), InversionSettings(steps=2)),
                                ValueError, MULTIPLE_OF_64),
    "frames_not_64_training": (lambda b, v, t: train_motion_lora(b, synthetic_clip(2, 64, 100), TrainingSettings(
        steps=1)), ValueError, MULTIPLE_OF_64),
    "working_size_not_64": (lambda b, v, t: prepare_video(v, PipelineSettings(working_size=(60, 100))), ValueError,
                            r"multiples of 64 \(e.g. 1024x576\)"),
    "one_frame_video": (_edit(frames=synthetic_clip(1)), InvalidInput, "needs at least 2 frames, got 1"),
    "nan_in_frames": (lambda b, v, t: _edit(frames=with_value(v, (1, 0, 5, 5), NAN))(b, v, t), InvalidInput,
                      "NaN or infinite values; check the node or file"),
    "inf_in_frames": (lambda b, v, t: _edit(frames=with_value(v, (2, 1, 0, 0), INF))(b, v, t), InvalidInput,
                      "NaN or infinite values; check the node or file"),
    # edited first frame
    "edited_size_differs": (_edit(edit=torch.zeros(1, 3, 32, 32)), InvalidInput,
                            "edit frame 0 at the video's own size .or resize it to match."),
    "edited_batch_of_0": (_edit(edit=torch.zeros(0, 3, 64, 64)), InvalidInput, "needs at least 1 frames, got 0"),
    "edited_empty_list": (_edit(edit=[]), InvalidInput, "is empty: pass at least one frame"),
    "nan_in_edited_frame": (lambda b, v, t: _edit(edit=with_value(edited(v), (0, 0, 3, 3), NAN))(b, v, t),
                            InvalidInput, "NaN or infinite values"),
    # mask
    "nan_in_mask": (_edit(mask=with_value(torch.ones(64, 64), (3, 3), NAN)), InvalidInput, r"finite values in \[0, 1\]"),
    "inf_in_mask": (_edit(mask=with_value(torch.ones(64, 64), (3, 3), INF)), InvalidInput, r"finite values in \[0, 1\]"),
    "mask_above_1": (_edit(mask=torch.full((64, 64), 2.0)), InvalidInput, r"finite values in \[0, 1\]"),
    "mask_wrong_size": (_edit(mask=torch.ones(32, 32)), InvalidInput,
                        "mask is 32x32 but the video is 64x64: give one .H, W. mask at the video's size"),
    "mask_per_frame": (_edit(mask=torch.ones(3, 64, 64)), InvalidInput, "give one .H, W. mask at the video's size"),
    # clip layout
    "overlap_equals_clip": (lambda b, v, t: PipelineSettings(clip_length=3, overlap=3), ValueError,
                            "lower the overlap"),
    "overlap_above_clip": (lambda b, v, t: PipelineSettings(clip_length=3, overlap=5), ValueError, "lower the overlap"),
    "clip_length_1": (lambda b, v, t: PipelineSettings(clip_length=1), ValueError, "clip_length must be at least 2"),
    "memory_unknown": (lambda b, v, t: PipelineSettings(memory="lots"), ValueError, "memory must be one of auto"),
    "memory_budget_0": (lambda b, v, t: PipelineSettings(memory=0), ValueError, "GiB budget > 0"),
    # matching
    "threshold_above_1": (lambda b, v, t: MatchSettings(thresholds=(0.35, 1.5)), ValueError, r"in \[0, 1\]"),
    "threshold_below_0": (lambda b, v, t: MatchSettings(thresholds=(-0.1, 0.35)), ValueError, r"in \[0, 1\]"),
    "threshold_nan": (lambda b, v, t: MatchSettings(thresholds=(NAN, 0.35)), ValueError, r"in \[0, 1\]"),
    "beta1_above_beta2": (lambda b, v, t: TemporalSelector(0.9, 0.5), ValueError, "swap them if beta1 > beta2"),
    "beta_above_1": (lambda b, v, t: TemporalSelector(0.5, 1.2), ValueError, "0 <= beta1 <= beta2 <= 1"),
    "unknown_preset": (lambda b, v, t: TemporalSelector.preset("wild"), ValueError, "use one of"),
    "guidance_below_1": (lambda b, v, t: EditSettings(min_guidance=0.5), ValueError, "CFG scale >= 1"),
    "guidance_nan": (lambda b, v, t: EditSettings(max_guidance=NAN), ValueError, "finite CFG scale >= 1"),
    "guidance_inf": (lambda b, v, t: EditSettings(max_guidance=INF), ValueError, "finite CFG scale >= 1"),
    # steps, training
    "inversion_steps_0": (lambda b, v, t: InversionSettings(steps=0), ValueError, "positive integer .paper: 25."),
    "inversion_steps_float": (lambda b, v, t: InversionSettings(steps=2.5), ValueError, "positive integer"),
    "sarp_alpha_negative": (lambda b, v, t: InversionSettings(sarp_alpha=-1.0), ValueError, "0 = SARP off"),
    "training_steps_0": (lambda b, v, t: TrainingSettings(steps=0), ValueError, "pass training=None"),
    "learning_rate_0": (lambda b, v, t: TrainingSettings(learning_rate=0.0), ValueError, r"> 0 \(paper: 5e-4\)"),
    "learning_rate_negative": (lambda b, v, t: TrainingSettings(learning_rate=-1e-4), ValueError, "> 0"),
    "learning_rate_nan": (lambda b, v, t: TrainingSettings(learning_rate=NAN), ValueError, "finite value > 0"),
    "adam_beta_1": (lambda b, v, t: TrainingSettings(betas=(0.9, 1.0)), ValueError, r"in \[0, 1\)"),
    "rank_0": (lambda b, v, t: LoraSpec(rank=0), ValueError, "rank must be a positive integer"),
    "rank_above_layer_width": (lambda b, v, t: train_motion_lora(b, synthetic_clip(2), TrainingSettings(
        steps=1, lora=LoraSpec(rank=64))), ValueError, "choose a rank <= 32"),
    # checkpoints
    "sd15_checkpoint": (_sd15_checkpoint, ValueError, "not a Stable Video Diffusion checkpoint.*pass an SVD img2vid"),
    "pickle_checkpoint": (_pickle_checkpoint, ValueError, "convert it to .safetensors first"),
    "image_model_folder": (_image_model_folder, ValueError, "pass a Stable Video Diffusion img2vid folder"),
    # motion LoRAs
    "lora_other_rank": (lambda b, v, t: (save_motion_lora(random_lora(b, rank=2), str(t / "r2.safetensors")),
                                         load_motion_lora(str(t / "r2.safetensors"), LoraSpec(rank=4))),
                        ValueError, "pick the matching file or change the LoRA settings"),
    "lora_other_clip_count": (_propagate_with(lambda b: [random_lora(b)] * 3), ValueError,
                              "compute them from the same clips"),
    "lora_other_frame_count": (_propagate_with(lambda b: [random_lora(b, metadata={"source_frames": "14"})]),
                               ValueError, "trained on a clip of 14 frames.*same frames per clip"),
    "lora_other_model_size": (lambda b, v, t: b.load_lora(random_lora(b, widen=16)), ValueError,
                              "it is a LoRA for another model size"),
    "lora_file_missing": (lambda b, v, t: load_motion_lora(str(t / "nope.safetensors")), ValueError, "does not exist"),
    "lora_file_empty": (_lora_file(_write_bytes(b"")), ValueError, "corrupt or truncated"),
    "lora_file_random_bytes": (_lora_file(_write_bytes(bytes(range(256)) * 8)), ValueError, "corrupt or truncated"),
    "lora_file_corrupt_header": (_lora_file(_corrupt), ValueError, "corrupt or truncated"),
    "lora_file_truncated": (_lora_file(_truncated), ValueError, "corrupt or truncated"),
    "lora_file_pickle_zip": (_lora_file(_torch_pickle(True), ".pt"), ValueError,
                             "pickle that holds more than tensors; it is refused.*convert it to safetensors"),
    "lora_file_pickle_legacy": (_lora_file(_torch_pickle(False), ".pt"), ValueError,
                                "pickle that holds more than tensors; it is refused"),
    "lora_file_image_lora": (_lora_file(_sd15_lora), ValueError, "not a motion LoRA in ComfyUI format"),
    "lora_file_nan": (_lora_file(_nan_lora), ValueError, "NaN or infinite values: retrain or re-download it"),
    # cache folder
    "cache_folder_is_under_a_file": (_cache_in_a_file, ValueError, "choose another folder or run without a cache"),
    "cache_folder_read_only": (_cache_unwritable(), ValueError, "not writable .Permission denied.; choose another"),
    "cache_folder_full": (_cache_full, ValueError, "free disk space or choose another cache folder"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input(case, backend, video, tmp_path):
    call, error_type, message = BAD_INPUTS[case]
    with pytest.raises(Exception) as caught:
        call(backend, video, tmp_path)
    assert type(caught.value) is error_type, f"{case}: {type(caught.value).__name__}: {caught.value}"
    assert re.search(message, str(caught.value)), f"{case}: {caught.value}"
    assert not backend.lora_parameters(), f"{case} left a motion LoRA attached"


# --- documented correct handling ----------------------------------------------------------------------

def test_two_frame_video_works(backend):
    frames = synthetic_clip(2, 64, 64)
    result = edit_video(backend, frames, edited(frames), FAST)
    assert result.edits[0].frames.shape == (2, 3, 64, 64) and [list(c) for c in result.clips] == [[0, 1]]


def test_frames_per_clip_above_video_length_gives_one_short_clip(backend, video):
    result = edit_video(backend, video, edited(video), PipelineSettings(
        clip_length=14, working_size=(64, 64), inversion=InversionSettings(steps=2), training=None))
    assert [list(c) for c in result.clips] == [[0, 1, 2]] and result.edits[0].frames.shape == video.shape


def test_any_size_is_fitted_to_multiples_of_64_and_back(backend):
    """edit_video's documented fit: sizes that are not multiples of 64 work; the output keeps the input size."""
    frames = synthetic_clip(2, 64, 128)[..., :50, :90]
    for fit in ("resize", "pad"):
        settings = PipelineSettings(clip_length=2, working_size=(64, 128), fit=fit,
                                    inversion=InversionSettings(steps=2), training=None)
        out = edit_video(backend, frames, frames[:1], settings).edits[0]
        assert out.frames.shape == (2, 3, 50, 90) and out.difference_map.shape == (2, 1, 50, 90)
        assert bool(torch.isfinite(out.frames).all())


# --- GPU out of memory at each stage: a clear message, the original kept, the backend left clean -------------

def _oom(*args, **kwargs):
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


@pytest.mark.parametrize("stage, where", [
    ("inversion", "backend.denoise"), ("motion-LoRA training", "training.step_on"),
    ("denoising", "pipeline.edit_clip"), ("VAE decoding", "backend.decode")])
@pytest.mark.parametrize("memory, lower", [("fast", "24gb"), ("24gb", "12gb"), ("12gb", None)])
def test_out_of_memory_names_the_next_memory_setting_down(backend, video, monkeypatch, stage, where, memory, lower):
    owner, name = where.split(".")
    target = {"backend": backend, "training": training_module, "pipeline": pipeline_module}[owner]
    monkeypatch.setattr(target, name, _oom)
    with pytest.raises(OutOfMemory) as caught:
        edit_video(backend, video, edited(video), replace(TRAINED, memory=memory))
    message = str(caught.value)
    assert f"out of GPU memory during {stage}" in message and "smaller working size" in message
    advised = [tier for tier in ("fast", "24gb", "12gb") if f"memory to '{tier}'" in message]
    assert advised == ([lower] if lower else [])  # the next setting down, never the one in use
    assert lower is not None or "already at its lowest setting ('12gb')" in message
    assert isinstance(caught.value, torch.cuda.OutOfMemoryError)  # hosts that free memory on OOM still see one
    assert type(caught.value.__cause__) is torch.cuda.OutOfMemoryError and "20.00 GiB" in str(caught.value.__cause__)
    assert not backend.lora_parameters()


# --- cancel during each stage ------------------------------------------------------------------------------

@pytest.mark.parametrize("stage, error", [("invert", Cancelled), ("train", TrainingCancelled), ("edit", Cancelled)])
def test_cancel_during_each_stage(backend, video, stage, error):
    seen = []
    with pytest.raises(Exception) as caught:
        edit_video(backend, video, edited(video), TRAINED, progress=seen.append,
                   cancel=lambda: bool(seen) and seen[-1]["stage"] == stage)
    assert type(caught.value) is error and "cancelled" in str(caught.value)
    assert [e["stage"] for e in seen].count(stage) == 1, "must stop at the first check inside the stage"
    assert not backend.lora_parameters(), "a cancelled run must not leave the motion LoRA attached"


# --- determinism, and recovery after failures ----------------------------------------------------------------

DETERMINISM = PipelineSettings(clip_length=3, overlap=1, working_size=(64, 64), inversion=InversionSettings(steps=2),
                               training=TrainingSettings(steps=2, lora=LoraSpec(rank=2)))


@pytest.fixture(scope="module")
def reference():
    """A 5-frame, 2-clip edit (training, skip-interval, hand-off) on a freshly built backend."""
    frames = synthetic_clip(5, 64, 64, seed=3)
    return frames, edit_video(tiny_backend(seed=0), frames, edited(frames), DETERMINISM).edits[0]


def test_same_seed_same_inputs_bit_identical_on_cpu(backend, reference):
    frames, first = reference
    for attempt in range(2):  # the shared, already used backend: nothing carried over between runs
        again = edit_video(backend, frames, edited(frames), DETERMINISM).edits[0]
        assert torch.equal(again.frames, first.frames), f"run {attempt + 2} differs"
        assert torch.equal(again.difference_map, first.difference_map)


def processors(backend):
    return {name: type(p) for name, p in backend.unet.attn_processors.items()}


def test_failure_mid_forward_leaves_no_attention_control_and_the_next_run_is_exact(backend, reference, monkeypatch):
    from i2vedit_core.attention.controller import AttentionController

    frames, first = reference
    before = processors(backend)
    real = AttentionController.attend

    def fail_in_edit_forward(self, q, k, v, site, attention_pass):
        if attention_pass.match and site.kind == "temporal":  # half-way through the first matched edit forward
            raise RuntimeError("injected failure inside attention")
        return real(self, q, k, v, site, attention_pass)

    monkeypatch.setattr(AttentionController, "attend", fail_in_edit_forward)
    with pytest.raises(RuntimeError, match="injected failure"):
        edit_video(backend, frames, edited(frames), DETERMINISM)
    monkeypatch.undo()
    assert processors(backend) == before, "attention processors left installed"
    assert not backend.lora_parameters()
    again = edit_video(backend, frames, edited(frames), DETERMINISM).edits[0]
    assert torch.equal(again.frames, first.frames)


# --- security ---------------------------------------------------------------------------------------------

SCANNED = [p for p in REPO.rglob("*.py") if not ({".git", "__pycache__", ".venv"} & set(p.parts))]
# lora.py names pickle only to catch the refusal of weights-only loading; tests may also write hostile pickles
# (to prove they are refused), never read one.
PICKLE_IN_CODE = {"UnpicklingError"}
PICKLE_IN_TESTS = PICKLE_IN_CODE | {"dumps", "dump", "HIGHEST_PROTOCOL"}
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _security_findings(path: Path, root: Path = REPO):
    tree = ast.parse(path.read_text(), str(path))
    # a pip command runs only as an argument of a call (os.system, subprocess...); a message or constant
    # telling the user what to install does not
    in_calls = {id(inner) for call in ast.walk(tree) if isinstance(call, ast.Call)
                for argument in call.args + [k.value for k in call.keywords] for inner in ast.walk(argument)}
    for node in ast.walk(tree):
        where = f"{path.relative_to(root)}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else None
            if name in ("eval", "exec", "__import__"):
                yield f"{where} calls {name}()"
            if isinstance(func, ast.Attribute) and func.attr == "load" and isinstance(func.value, ast.Name) \
                    and func.value.id == "torch":
                weights_only = [k for k in node.keywords if k.arg == "weights_only"]
                if not (weights_only and isinstance(weights_only[0].value, ast.Constant)
                        and weights_only[0].value.value is True):
                    yield f"{where} calls torch.load without weights_only=True"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in UNSAFE_MODULES - {"pickle"}:
                    yield f"{where} imports {alias.name}"
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            yield f"{where} imports from {node.module}"
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "pickle" \
                and node.attr not in (PICKLE_IN_TESTS if "tests" in path.relative_to(root).parts else PICKLE_IN_CODE):
            yield f"{where} uses pickle.{node.attr}"
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) in in_calls and \
                re.search(r"\bpip3?\b.{0,20}\binstall\b|ensurepip", node.value) and "tests" not in path.parts:
            yield f"{where} has a string that runs pip: {node.value[:60]!r}"  # tests: README checks quote it


def test_no_pickle_no_unsafe_torch_load_no_eval_no_runtime_pip():
    assert len(SCANNED) > 50, "the scan must see the repository"
    findings = [f for path in SCANNED for f in _security_findings(path)]
    assert findings == []


def test_the_scan_catches_what_it_forbids(tmp_path):
    bad = tmp_path / "probe.py"
    bad.write_text("import dill\nimport torch, pickle\npickle.loads(b'')\ntorch.load('x')\n"
                   "torch.load('x', weights_only=False)\neval('1')\nexec('1')\nos.system('pip install x')\n")
    assert len(list(_security_findings(bad, tmp_path))) == 7


NO_NETWORK_EDIT = """
import socket
def refuse(*args, **kwargs):
    raise OSError("network access attempted")
socket.socket.connect = refuse
socket.socket.connect_ex = refuse
socket.socket.sendto = refuse
socket.create_connection = refuse
socket.getaddrinfo = refuse
import torch
from i2vedit_core.inversion import InversionSettings
from i2vedit_core.lora import LoraSpec
from i2vedit_core.pipeline import PipelineSettings, edit_video
from i2vedit_core.tiny import synthetic_clip, tiny_backend
from i2vedit_core.training import TrainingSettings
frames = synthetic_clip(3, 64, 64)
settings = PipelineSettings(clip_length=2, overlap=1, working_size=(64, 64), inversion=InversionSettings(steps=2),
                            training=TrainingSettings(steps=1, lora=LoraSpec(rank=2)))
result = edit_video(tiny_backend(), frames, frames[:1], settings)
print("ok", tuple(result.edits[0].frames.shape), len(result.clips))
"""


def test_end_to_end_edit_with_sockets_refused(tmp_path):
    env = {"PATH": "", "HOME": str(tmp_path), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}  # no HF_HUB_OFFLINE
    result = subprocess.run([sys.executable, "-c", NO_NETWORK_EDIT], capture_output=True, text=True, env=env,
                            timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ok (3, 3, 64, 64) 2" in result.stdout
