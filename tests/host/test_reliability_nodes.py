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
from test_nodes import clips, nodes, parts, source  # noqa: F401 (shared module fixtures)
from test_nodes import (CLIP_WIDGETS, INVERT_WIDGETS, MATCH_WIDGETS, TRAIN_WIDGETS, assert_unchanged, edited, run,
                        snapshot, video)

from i2vedit_core.attention.controller import AttentionController
from i2vedit_core.pipeline import OutOfMemory


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
    import comfy.model_management as mm

    assert_unchanged(model, before)
    assert our_patches_left(model) == []
    assert not any(loaded.model.model is model.model and loaded.model is not model
                   for loaded in mm.current_loaded_models), "the backend's clone is still loaded"


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
                                                      **MATCH_WIDGETS), ValueError, "NaN or infinite"),
    "exception_mid_forward": (lambda n, p, s, c, r, m: (
        m.setattr(AttentionController, "attend", _fail_in_edit_forward(AttentionController.attend)),
        propagate(n, p, s, r["inversion"], r["loras"])), RuntimeError, "injected failure inside attention"),
    "oom_in_training": (lambda n, p, s, c, r, m: (m.setattr("i2vedit_core.training.training_step", _oom),
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
