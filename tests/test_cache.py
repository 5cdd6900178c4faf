import dataclasses
import os

import pytest
import torch

from i2vedit_core.cache import ArtifactCache, fingerprint


@dataclasses.dataclass(frozen=True)
class Settings:
    steps: int = 25
    beta: tuple = (0.5, 0.8)


def test_fingerprint_changes_with_any_input():
    frames = torch.zeros(2, 3, 4, 4)
    base = fingerprint(frames, Settings(), "model-a")
    assert base == fingerprint(frames.clone(), Settings(), "model-a")
    changed = frames.clone()
    changed[1, 2, 3, 3] = 1e-6
    assert len({base, fingerprint(changed, Settings(), "model-a"), fingerprint(frames, Settings(steps=24), "model-a"),
                fingerprint(frames, Settings(), "model-b"), fingerprint(frames.half(), Settings(), "model-a"),
                fingerprint(frames.view(1, 6, 4, 4), Settings(), "model-a")}) == 6


def test_memory_and_folder_round_trip(tmp_path):
    cache = ArtifactCache(tmp_path)
    cache.put("k", {"latents": torch.arange(6.0).view(2, 3)}, {"steps": 25})
    fresh = ArtifactCache(tmp_path)  # a new process sees the folder entry
    tensors, metadata = fresh.get("k")
    assert torch.equal(tensors["latents"], torch.arange(6.0).view(2, 3)) and metadata == {"steps": "25"}
    assert "k" in fresh and fresh.get("other") is None
    assert not list(tmp_path.glob("*.partial"))


def test_memory_is_bounded():
    cache = ArtifactCache(max_in_memory=2)
    for key in "abc":
        cache.put(key, {"x": torch.zeros(1)})
    assert "a" not in cache and "b" in cache and "c" in cache


def test_interrupted_write_leaves_no_entry(tmp_path, monkeypatch):
    import i2vedit_core.cache as cache_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cache_module, "save_file", interrupted)
    cache = ArtifactCache(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        cache.put("k", {"x": torch.zeros(1)})
    assert list(tmp_path.iterdir()) == [] and "k" not in cache


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to read-only folders")
def test_read_only_folder_is_a_clear_error(tmp_path):
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(ValueError, match="not writable"):
            ArtifactCache(tmp_path / "sub")
    finally:
        tmp_path.chmod(0o700)


def test_unwritable_path_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="not writable"):
        ArtifactCache(blocker / "sub")


def test_diffusers_backend_identity_follows_the_weights():
    from i2vedit_core.tiny import tiny_backend
    a, b, other = tiny_backend(seed=0), tiny_backend(seed=0), tiny_backend(seed=5)
    assert a.identity() == b.identity() != other.identity()
    with torch.no_grad():
        b.vae.decoder.conv_out.weight.view(-1)[0] += 1.0  # a changed VAE changes inversions too
    assert a.identity() != b.identity()
