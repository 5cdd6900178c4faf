"""The pack's nodes called directly, under torch.inference_mode() as ComfyUI's executor calls them.

Tiny SVD from ComfyUI's classes (conftest), a 3-frame 64x96 video cut into 2 clips of 2 frames at a
64x64 working size, 2 inversion steps and 1 training step: small, but every stage and the clip
hand-off run. Every test checks that the incoming MODEL's weights and model_options are untouched.
"""

import copy

import pytest
import torch

from pack import node_classes, node_module

SIZE = (64, 96)  # source height, width: not the working size, so the output must be resized back
CLIP_WIDGETS = dict(frames_per_clip=2, overlap=1, working_width=64, working_height=64, fit="resize")
INVERT_WIDGETS = dict(steps=2, sarp=True, sarp_scale=0.005, random_seed=0)
MATCH_WIDGETS = dict(preset="local", beta1=0.5, beta2=0.8, threshold_first=0.35, threshold_last=0.35,
                     min_guidance=1.0, max_guidance=2.5, random_seed=0)
TRAIN_WIDGETS = dict(training_steps=1, rank=2, learning_rate=5e-4, random_seed=0)


def video(frames=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(1, *SIZE, 3, generator=g)
    return torch.cat([base.roll(i * 4, dims=2) for i in range(frames)])  # a texture moving right


def edited(image):
    out = image[:1].clone()
    out[:, 16:40, 24:56] = torch.tensor([1.0, 0.0, 0.0])
    return out


def snapshot(model):
    import comfy.model_management as mm

    params = {n: (p, p.is_inference()) for n, p in model.model.named_parameters()}
    others = [m for m in mm.current_loaded_models if m.model is not None and m.model.model is not model.model]
    return ({k: v.clone() for k, v in model.model.state_dict().items()}, copy.deepcopy(model.model_options),
            dict(model.object_patches), {k: list(v) for k, v in model.patches.items()}, params, others)


def assert_unchanged(model, before):
    """Weights, options and patches of MODEL as before; the shared BaseModel's parameters the same objects with
    the same inference-ness (training swaps them for a while); no other model's loaded entry removed by us."""
    import comfy.model_management as mm

    weights, options, object_patches, patches, params, others = before
    after = model.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in weights.items())
    assert model.model_options == options
    assert dict(model.object_patches) == object_patches and {k: list(v) for k, v in model.patches.items()} == patches
    now = dict(model.model.named_parameters())
    assert all(now[n] is p and p.is_inference() == inference for n, (p, inference) in params.items())
    # An entry whose model was garbage-collected meanwhile is ComfyUI's own clean-up (cleanup_models, run by the
    # finalizer on the collected model), not ours.
    assert all(any(m is entry for m in mm.current_loaded_models) for entry in others if entry.model is not None)


def run(node, **inputs):
    with torch.inference_mode():
        return node.execute(**inputs)


@pytest.fixture(scope="module")
def nodes():
    return {cls.define_schema().node_id: cls for cls in node_classes()}


@pytest.fixture(scope="module")
def parts(comfy_parts):
    return dict(model=comfy_parts["model"], clip_vision=comfy_parts["clip_vision"], vae=comfy_parts["vae"])


@pytest.fixture(scope="module")
def source():
    return video()


@pytest.fixture(scope="module")
def clips(nodes, source):
    return run(nodes["I2VEditSourceClips"], frames=source, **CLIP_WIDGETS)[0]


@pytest.fixture(scope="module")
def inversion(nodes, parts, clips):
    before = snapshot(parts["model"])
    out = run(nodes["I2VEditInvert"], clips=clips, **parts, **INVERT_WIDGETS)[0]
    assert_unchanged(parts["model"], before)
    return out


def test_every_node_has_a_description_and_tooltips(nodes):
    assert len(nodes) == 11
    for node_id, cls in nodes.items():
        schema = cls.define_schema()
        assert schema.description and schema.display_name.startswith("I2VEdit"), node_id
        assert all(i.tooltip for i in schema.inputs), [i.id for i in schema.inputs if not i.tooltip]


def test_source_clips(nodes, source):
    clips, summary = run(nodes["I2VEditSourceClips"], frames=source, **CLIP_WIDGETS).args
    assert [list(c) for c in clips.video.clips] == [[0, 1], [1, 2]]
    assert tuple(clips.video.source.shape) == (3, 3, 64, 64) and tuple(clips.frames.shape) == (3, 3, *SIZE)
    assert summary == "3 frames in 2 clips at 64x64"
    with pytest.raises(ValueError, match="lower the overlap"):
        run(nodes["I2VEditSourceClips"], frames=source, **dict(CLIP_WIDGETS, overlap=2))


def test_inversion_is_on_the_cpu_per_clip(inversion):
    assert len(inversion.inversions) == 2
    assert all(i.latents.device.type == "cpu" and tuple(i.latents.shape) == (3, 1, 2, 4, 8, 8)
               for i in inversion.inversions)


def test_propagate_two_edits_frame_count_and_size(nodes, parts, source, inversion):
    before = snapshot(parts["model"])
    edits = torch.cat([edited(source), source[:1]])
    frames, maps = run(nodes["I2VEditPropagate"], inversion=inversion, edited_first_frames=edits, **parts,
                       **MATCH_WIDGETS).args
    assert_unchanged(parts["model"], before)
    assert tuple(frames.shape) == (6, *SIZE, 3) and tuple(maps.shape) == (6, *SIZE, 3)
    assert 0 <= float(frames.min()) and float(frames.max()) <= 1 and torch.isfinite(frames).all()
    assert not torch.equal(frames[:3], frames[3:])  # the two edits differ


def test_propagate_mask_steers_the_denoising_and_keeps_the_source_outside(nodes, parts, source, inversion):
    """The MASK reaches the core's latent blending (pixels inside it change vs no MASK), and the paste keeps
    the outside exactly the source; paste_source off leaves the VAE's version of it."""
    mask = torch.zeros(1, *SIZE)
    mask[:, 16:40, 24:56] = 1
    widgets = dict(inversion=inversion, edited_first_frames=edited(source), **parts,
                   **dict(MATCH_WIDGETS, preset="custom", beta1=0.2, beta2=0.3))
    plain, _ = run(nodes["I2VEditPropagate"], **widgets).args
    masked, _ = run(nodes["I2VEditPropagate"], mask=mask, **widgets).args
    unpasted, _ = run(nodes["I2VEditPropagate"], mask=mask, paste_source=False, **widgets).args
    inside, outside = mask[0] > 0.5, mask[0] < 0.5
    assert float((masked[:, inside] - plain[:, inside]).abs().max()) > 1e-2
    torch.testing.assert_close(masked[:, inside], unpasted[:, inside], rtol=0, atol=1e-6)  # the paste is outside only
    torch.testing.assert_close(masked[:, outside], source[:, outside], rtol=0, atol=1e-6)
    assert float((unpasted[:, outside] - source[:, outside]).abs().max()) > 1e-3


def test_propagate_rejects_a_wrong_size_edit(nodes, parts, source, inversion):
    with pytest.raises(ValueError, match="edit frame 0 at the video's own size"):
        run(nodes["I2VEditPropagate"], inversion=inversion, edited_first_frames=source[:1, :32], **parts,
            **MATCH_WIDGETS)


def test_train_save_load_and_propagate_with_lora(nodes, parts, source, clips, inversion, tmp_path, monkeypatch):
    before = snapshot(parts["model"])
    loras, curve = run(nodes["I2VEditTrainMotionLora"], clips=clips, inversion=inversion, **parts,
                       **TRAIN_WIDGETS).args
    assert_unchanged(parts["model"], before)
    assert len(loras.loras) == 2 and [len(l) for l in loras.losses] == [1, 1]
    assert curve.ndim == 4 and curve.shape[-1] == 3

    files = node_module("lora_files")
    monkeypatch.setattr(files, "loras_folder", lambda: tmp_path)
    names = run(nodes["I2VEditSaveMotionLora"], motion_lora=loras, name="sub/clip", overwrite=False)[0]
    assert names.split("\n") == ["sub/clip_clip01of02.safetensors", "sub/clip_clip02of02.safetensors"]
    with pytest.raises(ValueError, match="turn on overwrite"):
        run(nodes["I2VEditSaveMotionLora"], motion_lora=loras, name="sub/clip", overwrite=False)
    loaded = files.load_series(tmp_path / "sub" / "clip_clip02of02.safetensors")
    assert [sorted(l.weights) for l in loaded.loras] == [sorted(l.weights) for l in loras.loras]

    frames, _ = run(nodes["I2VEditPropagate"], inversion=inversion, edited_first_frames=edited(source),
                    motion_lora=loaded, **parts, **MATCH_WIDGETS).args
    assert tuple(frames.shape) == (3, *SIZE, 3)
    assert_unchanged(parts["model"], before)


@pytest.mark.parametrize("name", ["../escape", "/abs/path", "a/../../b", "bad:name", ""])
def test_lora_names_cannot_escape(name, tmp_path):
    files = node_module("lora_files")
    with pytest.raises(ValueError, match="not allowed|outside"):
        files.save_series(None, name, False, tmp_path)


def test_edit_video_all_in_one(nodes, parts, source):
    before = snapshot(parts["model"])
    widgets = {**CLIP_WIDGETS, **INVERT_WIDGETS, **TRAIN_WIDGETS, **MATCH_WIDGETS, "train_motion_lora": False}
    frames, maps = run(nodes["I2VEditEditVideo"], frames=source, edited_first_frame=edited(source), **parts,
                       **widgets).args
    assert_unchanged(parts["model"], before)
    assert tuple(frames.shape) == (3, *SIZE, 3) and tuple(maps.shape) == (3, *SIZE, 3)


def test_official_numerics_one_widget_through_the_chain(nodes, parts, source, clips, inversion):
    """`numerics` on Invert is followed by Propagate and the Matched Sampler; Edit Video's widget gives the
    same frames as the chain; and the setting changes the edit (so the equalities below could fail)."""
    from i2vedit_core.presets import edit_with_numerics, with_numerics

    official = run(nodes["I2VEditInvert"], clips=clips, **parts, **INVERT_WIDGETS, numerics="official")[0]
    settings = official.settings.inversion
    assert settings.cond_8bit and not settings.vae_sample  # ComfyUI's VAE gives the posterior mode
    chain = run(nodes["I2VEditPropagate"], inversion=official, edited_first_frames=edited(source), **parts,
                **MATCH_WIDGETS).args[0]
    plain = run(nodes["I2VEditPropagate"], inversion=inversion, edited_first_frames=edited(source), **parts,
                **MATCH_WIDGETS).args[0]
    widgets = {**CLIP_WIDGETS, **INVERT_WIDGETS, **TRAIN_WIDGETS, **MATCH_WIDGETS, "train_motion_lora": False}
    all_in_one = run(nodes["I2VEditEditVideo"], frames=source, edited_first_frame=edited(source), **parts,
                     **widgets, numerics="official").args[0]
    torch.testing.assert_close(all_in_one, chain, rtol=0, atol=1e-5)
    assert float((chain - plain).abs().max()) > 1e-3
    sampler = run(nodes["I2VEditMatchedSampler"], inversion=official, **parts,
                  **{k: v for k, v in MATCH_WIDGETS.items() if k != "random_seed"}).result[0]
    edit = sampler.extra_options["job"].edit
    assert edit.source_step_offset == 1 and edit.matching.official_ramp
    assert edit == edit_with_numerics(edit, "official") != edit_with_numerics(edit, "default")
    assert with_numerics(official.settings, "official", posterior_sample=False).inversion == settings


def test_metrics(nodes, source):
    report, plot = run(nodes["I2VEditMetrics"], source=source, output=source.flip(2),
                       edited_first_frame=edited(source)).args
    assert "flicker" in report and "psnr_unedited" in report
    assert plot.shape[0] == 1 and plot.shape[-1] == 3
    with pytest.raises(ValueError, match="compare one edit at a time"):
        run(nodes["I2VEditMetrics"], source=source, output=source[:2])


def test_cancel_interrupts_and_leaves_the_model_alone(nodes, parts, clips):
    import comfy.model_management as mm

    before = snapshot(parts["model"])
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            run(nodes["I2VEditInvert"], clips=clips, **parts, **INVERT_WIDGETS)
    finally:
        mm.interrupt_current_processing(False)
    assert_unchanged(parts["model"], before)
    unet = parts["model"].model  # the backend's clone was released: no patch of it left on the shared modules
    assert [n for n, m in unet.named_modules() if getattr(m.forward, "__func__", None) is not type(m).forward] == []


def _oom(*args, **kwargs):
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


MEMORY_NODES = {  # node id -> inputs besides MODEL, CLIP_VISION, VAE and the memory widget
    "I2VEditInvert": lambda s, c, i: dict(clips=c, **INVERT_WIDGETS),
    "I2VEditTrainMotionLora": lambda s, c, i: dict(clips=c, inversion=i, **TRAIN_WIDGETS),
    "I2VEditPropagate": lambda s, c, i: dict(inversion=i, edited_first_frames=edited(s), **MATCH_WIDGETS),
    "I2VEditEditVideo": lambda s, c, i: dict(frames=s, edited_first_frame=edited(s), train_motion_lora=True, **{
        **CLIP_WIDGETS, **INVERT_WIDGETS, **TRAIN_WIDGETS, **MATCH_WIDGETS}),
}


def test_every_node_that_runs_the_unet_has_the_memory_widget(nodes):
    runs_unet = [n for n, cls in nodes.items() if any(i.id == "model" for i in cls.define_schema().inputs)
                 and n != "I2VEditEditConditioning"]  # VAE and CLIP only
    assert sorted(runs_unet) == sorted([*MEMORY_NODES, "I2VEditMatchedSampler"])
    for node_id in runs_unet:
        memory = next(i for i in nodes[node_id].define_schema().inputs if i.id == "memory")
        assert memory.default == "auto" and memory.options == ["auto", "fast", "24gb", "12gb"], node_id


@pytest.mark.parametrize("node_id", sorted(MEMORY_NODES))
@pytest.mark.parametrize("memory, lower", [("auto", "24gb"), ("fast", "24gb"), ("24gb", "12gb"), ("12gb", None)])
def test_out_of_memory_through_the_widget_names_the_next_setting_down(node_id, memory, lower, nodes, parts, source,
                                                                       clips, inversion, monkeypatch):
    """auto on a CPU device is 'fast'; the advice is the next tier down, never the one in use."""
    from i2vedit_core.backends.comfy import ComfyBackend
    from i2vedit_core.pipeline import OutOfMemory

    monkeypatch.setattr(ComfyBackend, "denoise", _oom)
    with pytest.raises(OutOfMemory) as caught:
        run(nodes[node_id], **parts, memory=memory, **MEMORY_NODES[node_id](source, clips, inversion))
    message = str(caught.value)
    advised = [tier for tier in ("fast", "24gb", "12gb") if f"memory to '{tier}'" in message]
    assert advised == ([lower] if lower else []), message
    assert lower is not None or "already at its lowest setting" in message


def test_compile_switch_is_the_last_input_of_the_training_nodes_and_turns_compile_on():
    # Last, so that a workflow saved before the switch existed keeps its other widget values in place.
    train = node_module("train")
    assert train.training_settings(**TRAIN_WIDGETS).compile is None  # off: the memory setting decides (no compile)
    assert train.training_settings(**TRAIN_WIDGETS, compile_training=True).compile is True
    for node in (train.TrainMotionLoraNode, node_module("edit_video").EditVideoNode):
        assert node.define_schema().inputs[-1].id == "compile_training"
