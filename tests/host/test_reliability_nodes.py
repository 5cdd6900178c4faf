"""Reliability of the nodes inside a shared ComfyUI process (issue 7, host tier).

After a failing run (bad input, an exception injected mid-forward, GPU OOM) and after a cancelled run:
the incoming MODEL's weights, weight patches, object patches and model_options are as before, no
attention / LoRA / checkpointing patch of ours stays on the shared UNet modules, the backend's clone is
unloaded, and the next normal run succeeds and gives exactly what a run before any failure gave.
LoRA save names cannot leave models/loras.
"""

import pytest
import torch

from pack import node_classes, node_module
from test_nodes import clips, inversion, nodes, parts, source  # noqa: F401 (shared module fixtures)
from test_nodes import (CLIP_WIDGETS, INVERT_WIDGETS, MATCH_WIDGETS, TRAIN_WIDGETS, assert_unchanged, edited, run,
                        snapshot, video)

from i2vedit_core.attention.controller import AttentionController
from i2vedit_core.pipeline import OutOfMemory
from i2vedit_core.validation import InvalidInput


def invert(nodes, parts, clips):
    return run(nodes["I2VEditInvert"], clips=clips, **parts, **INVERT_WIDGETS)[0]


def train(nodes, parts, clips, inversion, **widgets):
    return run(nodes["I2VEditTrainMotionLora"], clips=clips, inversion=inversion, **parts,
               **dict(TRAIN_WIDGETS, **widgets))[0]


def propagate(nodes, parts, source, inversion, loras=None, **widgets):
    return run(nodes["I2VEditPropagate"], inversion=inversion, edited_first_frames=edited(source),
               motion_lora=loras, **parts, **dict(MATCH_WIDGETS, **widgets))[0]


@pytest.fixture(scope="module")
def reference(nodes, parts, source, clips):
    """Every stage once, before anything failed: what every later normal run must reproduce exactly."""
    inversion = invert(nodes, parts, clips)
    loras = train(nodes, parts, clips, inversion)
    return dict(inversion=inversion, loras=loras, frames=propagate(nodes, parts, source, inversion, loras))


def our_patches_left(model):
    """Attributes of ours (attention, LoRA, checkpointing forwards) still set on the shared UNet's modules."""
    return [(name, key) for name, module in model.model.diffusion_model.named_modules()
            for key, value in vars(module).items() if type(value).__module__.startswith("i2vedit_core")]


def assert_clean(model, before):
    """MODEL and the shared modules as before. An entry of the backend's clone in ComfyUI's loaded-model list may
    stay: the list is ComfyUI's, which drops or repatches it on the next load (backends/comfy.py `release`)."""
    assert_unchanged(model, before)
    assert our_patches_left(model) == []


def assert_next_runs_exact(nodes, parts, source, clips, reference):
    inversion = invert(nodes, parts, clips)
    assert all(torch.equal(a.latents, b.latents) for a, b in zip(inversion.inversions,
                                                                 reference["inversion"].inversions))
    loras = train(nodes, parts, clips, inversion)
    for a, b in zip(loras.loras, reference["loras"].loras):
        assert a.weights.keys() == b.weights.keys() and all(torch.equal(a.weights[k], b.weights[k]) for k in a.weights)
    assert torch.equal(propagate(nodes, parts, source, inversion, loras), reference["frames"])


def _fail_in_edit_forward(real):
    def attend(self, q, k, v, site, attention_pass):
        if attention_pass.match and site.kind == "temporal":  # half-way through a matched edit forward
            raise RuntimeError("injected failure inside attention")
        return real(self, q, k, v, site, attention_pass)
    return attend


def _oom(*args, **kwargs):
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


FAILURES = {
    # (what breaks, exception type, message): each runs a node that fails inside or before its backend
    "rank_above_layer_width": (lambda n, p, s, c, r, m: train(n, p, c, r["inversion"], rank=1024), ValueError,
                               "is above the width"),
    "guidance_below_1": (lambda n, p, s, c, r, m: propagate(n, p, s, r["inversion"], min_guidance=0.5), ValueError,
                         "CFG scale >= 1"),
    "edited_frame_nan": (lambda n, p, s, c, r, m: run(n["I2VEditPropagate"], inversion=r["inversion"],
                                                      edited_first_frames=edited(s) * float("nan"), **p,
                                                      **MATCH_WIDGETS), InvalidInput, "NaN or infinite"),
    "exception_mid_forward": (lambda n, p, s, c, r, m: (
        m.setattr(AttentionController, "attend", _fail_in_edit_forward(AttentionController.attend)),
        propagate(n, p, s, r["inversion"], r["loras"])), RuntimeError, "injected failure inside attention"),
    "oom_in_training": (lambda n, p, s, c, r, m: (m.setattr("i2vedit_core.training.step_on", _oom),
                                                  train(n, p, c, r["inversion"])), OutOfMemory, "memory to '24gb'"),
    "oom_in_decode": (lambda n, p, s, c, r, m: (
        m.setattr("i2vedit_core.backends.comfy.ComfyBackend.decode", _oom),
        run(n["I2VEditEditVideo"], frames=s, edited_first_frame=edited(s), **p, **{
            **CLIP_WIDGETS, **INVERT_WIDGETS, **TRAIN_WIDGETS, **MATCH_WIDGETS, "train_motion_lora": False})),
        OutOfMemory, "smaller working size"),
}


@pytest.mark.parametrize("case", sorted(FAILURES))
def test_after_a_failing_run_the_model_is_untouched_and_the_next_run_exact(case, nodes, parts, source, clips,
                                                                            reference, monkeypatch):
    call, error_type, message = FAILURES[case]
    before = snapshot(parts["model"])
    with pytest.raises(Exception) as caught:
        call(nodes, parts, source, clips, reference, monkeypatch)
    assert type(caught.value) is error_type and message in str(caught.value), repr(caught.value)
    monkeypatch.undo()
    assert_clean(parts["model"], before)
    assert_next_runs_exact(nodes, parts, source, clips, reference)


@pytest.mark.parametrize("stage", ["invert", "train", "edit"])
def test_after_a_cancelled_run_the_model_is_untouched_and_the_next_run_exact(stage, nodes, parts, source, clips,
                                                                              reference, monkeypatch):
    """Cancel (ComfyUI's interrupt flag) set from the progress callback once the stage has done a step."""
    import comfy.model_management as mm

    host = node_module("host")
    real = host.NodeProgress.__call__

    def progress(self, info):
        real(self, info)
        if info["stage"] == stage and info["step"] >= 1:
            mm.interrupt_current_processing(True)

    monkeypatch.setattr(host.NodeProgress, "__call__", progress)
    before = snapshot(parts["model"])
    try:
        with pytest.raises(mm.InterruptProcessingException):
            if stage == "invert":
                invert(nodes, parts, clips)
            elif stage == "train":
                train(nodes, parts, clips, reference["inversion"])
            else:
                propagate(nodes, parts, source, reference["inversion"], reference["loras"])
    finally:
        mm.interrupt_current_processing(False)
    monkeypatch.undo()
    assert_clean(parts["model"], before)
    assert_next_runs_exact(nodes, parts, source, clips, reference)


# --- LoRA files stay inside models/loras ------------------------------------------------------------------

@pytest.mark.parametrize("name", ["..", "../escape", "sub/../../x", "/etc/cron.d/x", "//server/share/x",
                                  "C:\\Windows\\x", "C:/x", "~/.ssh/x", "a*b", "what?", "pipe|x", "quote\"x",
                                  "less<x", "nul\x00byte", "new\nline", "tab\tname", "   ", ""])
def test_unsafe_save_names_are_refused(name, reference, tmp_path):
    files = node_module("lora_files")
    with pytest.raises(ValueError, match="is not allowed: use letters, digits"):
        files.save_series(reference["loras"], name, True, tmp_path / "loras")
    assert not (tmp_path / "loras").exists() or not any((tmp_path / "loras").rglob("*"))


def test_a_symlinked_subfolder_cannot_lead_outside(reference, tmp_path):
    files = node_module("lora_files")
    (tmp_path / "loras").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "loras" / "link").symlink_to(tmp_path / "outside")
    with pytest.raises(ValueError, match="leads outside models/loras: pick a plain name"):
        files.save_series(reference["loras"], "link/motion", True, tmp_path / "loras")
    assert list((tmp_path / "outside").iterdir()) == []


def test_saved_files_are_inside_the_loras_folder(nodes, reference, tmp_path, monkeypatch):
    files = node_module("lora_files")
    monkeypatch.setattr(files, "loras_folder", lambda: tmp_path / "loras")
    names = run(nodes["I2VEditSaveMotionLora"], motion_lora=reference["loras"], name="i2vedit/ok name-1.v2",
                overwrite=False)[0]
    written = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    assert len(written) == 2 and all((tmp_path / "loras").resolve() in p.resolve().parents for p in written)
    assert names.split("\n") == [str(p.relative_to(tmp_path / "loras")) for p in written]


def test_the_leak_check_sees_a_loaded_backend(parts):
    """our_patches_left is not vacuous: while a backend is loaded its forwards are on the shared modules."""
    from i2vedit_core.backends.comfy import ComfyBackend

    backend = ComfyBackend(parts["model"], parts["clip_vision"], parts["vae"])
    backend.load()
    try:
        assert len(our_patches_left(parts["model"])) >= 32
    finally:
        backend.release()
    assert our_patches_left(parts["model"]) == []


# --- held-out node matrix (issue 11): bad IMAGE / MASK / LoRA names refused before any backend exists ---------

EDIT_WIDGETS = {**CLIP_WIDGETS, **INVERT_WIDGETS, **TRAIN_WIDGETS, **MATCH_WIDGETS, "train_motion_lora": False}
HW = (64, 96)  # test_nodes.SIZE


def rgba(image, alpha):
    return torch.cat([image, torch.full_like(image[..., :1], alpha)], dim=-1)


def _edit_node(frames=None, edited_frame=None, mask=None):
    def call(n, p, s, r, folder):
        return run(n["I2VEditEditVideo"], frames=s if frames is None else frames(s),
                   edited_first_frame=edited(s) if edited_frame is None else edited_frame(s), mask=mask,
                   **p, **EDIT_WIDGETS)
    return call


def _propagate_node(edited_frames=None, mask=None):
    def call(n, p, s, r, folder):
        return run(n["I2VEditPropagate"], inversion=r["inversion"], **p, **MATCH_WIDGETS, mask=mask,
                   edited_first_frames=edited(s) if edited_frames is None else edited_frames(s))
    return call


def _save(name, overwrite=False, before=None):
    def call(n, p, s, r, folder):
        return run(n["I2VEditSaveMotionLora"], motion_lora=r["loras"], name=name, overwrite=overwrite)
    call.before = before
    return call


def _write(*names, folder_named=None):
    def make(folder):
        for name in names:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(b"a user's file: " + name.encode())
        if folder_named:
            (folder / folder_named).mkdir(parents=True)
    return make


SMALL = lambda s: edited(s)[:, :32, :32]  # noqa: E731
NODE_CASES = {
    # I2VEdit Edit Video: (call, words the one-line message must hold: the inputs and widgets to fix)
    "edit_mask_wrong_size": (_edit_node(mask=torch.ones(1, 32, 32)), ["mask is 32x32 but the video is 96x64"]),
    "edit_mask_count": (_edit_node(mask=torch.ones(2, *HW)), ["mask holds 2 masks", "one per frame (3)"]),
    "edit_mask_above_1": (_edit_node(mask=torch.full((1, *HW), 255.0)), ["mask must hold finite values in [0, 1]"]),
    "edit_edited_wrong_size": (_edit_node(edited_frame=SMALL), ["edited_first_frame is 32x32", "video's own size"]),
    "edit_edited_rgba_transparent": (_edit_node(edited_frame=lambda s: rgba(edited(s), 0.5)),
                                     ["edited_first_frame is RGBA with transparent pixels", "flatten"]),
    "edit_edited_16_bit_unscaled": (_edit_node(edited_frame=lambda s: edited(s) * 65535),
                                    ["edited_first_frame has values in", "16-bit", "divide by 65535"]),
    "edit_frames_16_bit_unscaled": (_edit_node(frames=lambda s: (s * 65535).round()), ["frames has values in"]),
    "edit_frames_nan": (_edit_node(frames=lambda s: s * float("nan")), ["frames contains NaN"]),
    "edit_frames_not_an_image": (_edit_node(frames=lambda s: s[0]), ["frames must be an IMAGE batch"]),
    "edit_two_problems_at_once": (_edit_node(edited_frame=SMALL, mask=torch.ones(1, 32, 32)),
                                  ["2 problems", "edited_first_frame", "mask"]),
    # I2VEdit Propagate
    "propagate_edited_wrong_size": (_propagate_node(edited_frames=SMALL), ["edited_first_frames is 32x32"]),
    "propagate_mask_wrong_size": (_propagate_node(mask=torch.ones(1, 32, 48)), ["mask is 48x32"]),
    "propagate_edited_rgba_transparent": (_propagate_node(edited_frames=lambda s: rgba(edited(s), 0.0)),
                                          ["edited_first_frames is RGBA with transparent pixels"]),
    "propagate_edited_two_channels": (_propagate_node(edited_frames=lambda s: edited(s)[..., :2]),
                                      ["edited_first_frames has 2 channels"]),
    # I2VEdit Source Clips
    "source_frames_rgba_transparent": (lambda n, p, s, r, f: run(n["I2VEditSourceClips"], frames=rgba(s, 0.2),
                                                                 **CLIP_WIDGETS), ["frames is RGBA"]),
    # I2VEdit Save Motion LoRA: name collisions keep every existing file
    "save_name_taken": (_save("i2vedit/motion", before=_write("i2vedit/motion_clip01of02.safetensors")),
                        ["name 'i2vedit/motion' is taken", "change name or turn on overwrite"]),
    "save_name_used_by_another_series": (_save("clip", before=_write("clip_clip01of03.safetensors")),
                                         ["clip_clip01of03.safetensors already exists", "change name"]),
    "save_name_used_by_a_single_file": (_save("clip", before=_write("clip.safetensors")),
                                        ["clip.safetensors already exists", "turn on overwrite"]),
    "save_name_is_a_folder": (_save("x", overwrite=True, before=_write(folder_named="x_clip01of02.safetensors")),
                              ["x_clip01of02.safetensors is a folder", "change name"]),
    "save_subfolder_is_a_file": (_save("plain/motion", overwrite=True, before=_write("plain")),
                                 ["plain is a file", "change name"]),
}


def digest(folder):
    import hashlib
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def random_loras():
    """Two clips' motion LoRAs with random weights (no training needed to test saving)."""
    from i2vedit_core.lora import LoraSpec, motion_lora_from_pairs, target_module_paths

    spec = LoraSpec(rank=2)
    g = torch.Generator().manual_seed(0)
    pairs = {p: (torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g))
             for p in target_module_paths(["input_blocks.1.1.time_stack.0"], spec)}
    lora = motion_lora_from_pairs(pairs, spec)
    return node_module("artifacts").MotionLoras((lora, lora))


@pytest.fixture(scope="module")
def cheap(inversion, random_loras):
    """What the cases need from earlier stages without training: the inversion, and random clip LoRAs."""
    return dict(inversion=inversion, loras=random_loras)


@pytest.mark.parametrize("case", sorted(NODE_CASES))
def test_node_refuses_bad_input_before_any_backend(case, nodes, parts, source, cheap, tmp_path, monkeypatch):
    import time

    from i2vedit_core.backends import comfy as comfy_backend_module

    call, words = NODE_CASES[case]
    folder = tmp_path / "loras"
    folder.mkdir()
    if getattr(call, "before", None):
        call.before(folder)
    monkeypatch.setattr(node_module("lora_files"), "loras_folder", lambda: folder)
    built = []
    monkeypatch.setattr(comfy_backend_module, "ComfyBackend", lambda *a, **k: built.append(a) or 1 / 0)
    model_before, files_before = snapshot(parts["model"]), digest(folder)
    started = time.perf_counter()
    with pytest.raises(ValueError) as caught:
        call(nodes, parts, source, cheap, folder)
    seconds = time.perf_counter() - started
    message = str(caught.value)
    assert "\n" not in message and all(word in message for word in words), message
    assert built == [] and seconds < 5.0, (built, seconds)
    monkeypatch.undo()
    assert digest(folder) == files_before, "a file in models/loras changed"
    assert_clean(parts["model"], model_before)


def test_node_matrix_size():
    assert len(NODE_CASES) >= 20


def test_saving_a_series_is_all_or_nothing_and_keeps_the_umask(random_loras, tmp_path, monkeypatch):
    import os

    files = node_module("lora_files")
    real = files.save_motion_lora
    calls = []

    def second_fails(lora, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real(lora, path)
    monkeypatch.setattr(files, "save_motion_lora", second_fails)
    with pytest.raises(OSError):
        files.save_series(random_loras, "motion", False, tmp_path)
    assert list(tmp_path.iterdir()) == [], "a partial series or a temporary file was left"
    monkeypatch.undo()
    old = os.umask(0o002)
    try:
        written = files.save_series(random_loras, "motion", False, tmp_path)
    finally:
        os.umask(old)
    assert [p.stat().st_mode & 0o777 for p in written] == [0o664, 0o664]
