from dataclasses import replace

import pytest
import torch

from i2vedit_core.cache import ArtifactCache
from i2vedit_core.inversion import InversionSettings
from i2vedit_core.pipeline import Cancelled, PipelineSettings, edit_video
from i2vedit_core.tiny import synthetic_clip
from i2vedit_core.training import TrainingCancelled, TrainingSettings

SETTINGS = PipelineSettings(clip_length=6, overlap=1, working_size=(64, 64), inversion=InversionSettings(steps=2),
                            training=TrainingSettings(steps=2))


@pytest.fixture(scope="module")
def video():
    return synthetic_clip(20, 64, 64)


def edited(video):
    frame = video[0].clone()
    frame[:, 8:24, 36:56] = torch.tensor([0.9, 0.1, -0.6]).view(3, 1, 1)
    return frame


def stages(events):
    """Stages that did work (step > 0); a stage also reports step 0 when it starts, cached or not."""
    return {e["stage"] for e in events if e["step"] > 0}


def test_long_video_two_edits_then_cache_hit(backend, video, tmp_path):
    cache = ArtifactCache(tmp_path)
    events = []
    result = edit_video(backend, video, torch.stack([edited(video), video[0]]), SETTINGS, progress=events.append,
                        cache=cache)
    assert [(c.start, c.stop) for c in result.clips] == [(0, 6), (5, 11), (10, 16), (15, 20)]
    assert len(result.edits) == 2
    for edit in result.edits:
        assert edit.frames.shape == video.shape and bool(torch.isfinite(edit.frames).all())
        assert edit.difference_map.shape == (20, 1, 64, 64)
        assert 0 <= float(edit.difference_map.min()) and float(edit.difference_map.max()) <= 1
    assert not torch.equal(result.edits[0].frames, result.edits[1].frames)
    assert stages(events) == {"invert", "train", "edit", "decode"}
    assert {e["clip"] for e in events} == {0, 1, 2, 3}
    assert all("loss" in e for e in events if e["stage"] == "train" and e["step"] > 0)
    assert not hasattr(backend.unet, "peft_config") or not backend.lora_parameters(), "LoRA left attached"

    events.clear()
    again = edit_video(backend, video, edited(video)[None], SETTINGS, progress=events.append,
                       cache=ArtifactCache(tmp_path))  # a fresh process: the folder serves the entries
    assert stages(events) == {"edit", "decode"}, "second edit of the same video must skip inversion and training"
    assert torch.allclose(again.edits[0].frames, result.edits[0].frames, atol=1e-4)


def test_output_keeps_any_input_size_and_aspect(backend):
    video = synthetic_clip(3, 64, 128)[..., :50, :90]
    result = edit_video(backend, video, video[:1], PipelineSettings(
        clip_length=3, working_size=(64, 128), fit="pad", inversion=InversionSettings(steps=2), training=None))
    assert result.edits[0].frames.shape == (3, 3, 50, 90)


@pytest.mark.parametrize("stage", ["invert", "train", "edit"])
def test_cancel_stops_within_a_step_and_leaves_no_partial_cache(backend, video, tmp_path, stage):
    cache = ArtifactCache(tmp_path)
    seen = []

    def cancel():
        return bool(seen) and seen[-1]["stage"] == stage

    with pytest.raises((Cancelled, TrainingCancelled)):
        edit_video(backend, video[:6], edited(video)[None], SETTINGS, progress=seen.append, cancel=cancel, cache=cache)
    steps_in_stage = [e for e in seen if e["stage"] == stage]
    assert len(steps_in_stage) == 1, "must stop at the first check after the stage started"
    assert not list(tmp_path.glob("*.partial"))
    entries = sorted(p.name.split("-")[0] for p in tmp_path.glob("*.safetensors"))
    assert entries == {"invert": [], "train": ["inversion"], "edit": ["inversion", "lora"]}[stage]
    assert not backend.lora_parameters(), "a cancelled run must not leave the LoRA attached"
    resumed = edit_video(backend, video[:6], edited(video)[None], SETTINGS, cache=cache)
    assert resumed.edits[0].frames.shape == (6, 3, 64, 64)


def test_edited_frame_of_another_size(backend, video):
    with pytest.raises(ValueError, match="edited_first_frames is 32x32 but the video is 64x64"):
        edit_video(backend, video[:6], torch.zeros(1, 3, 32, 32), SETTINGS)


def test_no_edited_frame(backend, video):
    with pytest.raises(ValueError, match="edited first frames needs at least 1 frames|empty"):
        edit_video(backend, video[:6], torch.zeros(0, 3, 64, 64), SETTINGS)


# SARP off so that the source latent is exactly the VAE latent of the frames
MASK_SETTINGS = PipelineSettings(clip_length=6, working_size=(64, 64),
                                 inversion=InversionSettings(steps=3, sarp_alpha=0.0), training=None)


def test_all_one_mask_equals_no_mask_and_all_zero_mask_keeps_the_source(backend, video):
    """Latent blending alone (paste_source off) decodes to the source's VAE reconstruction; the paste makes
    the outside the source exactly."""
    clip = video[:6]
    unpasted = replace(MASK_SETTINGS, paste_source=False)
    plain = edit_video(backend, clip, edited(video)[None], MASK_SETTINGS).edits[0].frames
    ones = edit_video(backend, clip, edited(video)[None], MASK_SETTINGS, mask=torch.ones(64, 64)).edits[0].frames
    zeros = edit_video(backend, clip, edited(video)[None], unpasted, mask=torch.zeros(64, 64)).edits[0].frames
    pasted = edit_video(backend, clip, edited(video)[None], MASK_SETTINGS, mask=torch.zeros(64, 64)).edits[0].frames
    assert torch.equal(ones, plain)
    # all black: nothing may change, the source itself (no edit is run), with or without the paste
    assert torch.equal(zeros, clip) and torch.equal(pasted, clip)
    source_reconstruction = backend.decode(backend.encode(clip))  # what the unchanged source latent decodes to
    assert (plain - source_reconstruction).abs().max() > 0.1
    left = torch.zeros(64, 64)
    left[:, :32] = 1
    blended = edit_video(backend, clip, edited(video)[None], unpasted, mask=left).edits[0].frames
    kept = edit_video(backend, clip, edited(video)[None], MASK_SETTINGS, mask=left).edits[0].frames
    # latent blending alone keeps the outside near the source but not exact (the VAE decodes it); the paste
    # makes it exact, and the inside is edited either way
    assert not torch.equal(blended[..., 32:], clip[..., 32:])
    assert torch.equal(kept[..., 32:], clip[..., 32:])
    assert (kept[..., :32] - clip[..., :32]).abs().max() > 0.05


def test_bad_masks(backend, video):
    with pytest.raises(ValueError, match="mask is 32x32 but the video is 64x64"):
        edit_video(backend, video[:6], edited(video)[None], MASK_SETTINGS, mask=torch.ones(32, 32))
    with pytest.raises(ValueError, match=r"finite values in \[0, 1\]"):
        edit_video(backend, video[:6], edited(video)[None], MASK_SETTINGS, mask=torch.full((64, 64), float("nan")))


def test_two_edits_share_one_inversion_and_one_training_per_clip(backend, video, monkeypatch):
    import i2vedit_core.stages as stages_module
    calls = {"invert": 0, "train": 0}
    real_invert, real_train = stages_module.invert_clip, stages_module.train_motion_lora

    def counting_invert(*args, **kwargs):
        calls["invert"] += 1
        return real_invert(*args, **kwargs)

    def counting_train(*args, **kwargs):
        calls["train"] += 1
        return real_train(*args, **kwargs)

    monkeypatch.setattr(stages_module, "invert_clip", counting_invert)
    monkeypatch.setattr(stages_module, "train_motion_lora", counting_train)
    settings = PipelineSettings(clip_length=6, overlap=1, working_size=(64, 64), skip_interval=False,
                                inversion=InversionSettings(steps=2), training=TrainingSettings(steps=1))
    result = edit_video(backend, video[:11], torch.stack([edited(video), video[0]]), settings)
    assert len(result.clips) == 2 and calls == {"invert": 2, "train": 2}
    calls.update(invert=0, train=0)
    cache = ArtifactCache()
    edit_video(backend, video[:11], edited(video)[None], settings, cache=cache)
    edit_video(backend, video[:11], video[:1], settings, cache=cache)
    assert calls == {"invert": 2, "train": 2}, "the second call must hit the cache"
