import pytest
import torch
from safetensors.torch import save_file

from i2vedit_core.backends.diffusers_loading import load_svd, read_safetensors
from i2vedit_core.conditioning import frame_conditioning


def test_diffusers_folder_loads_offline_and_matches(svd_folder, backend, clip):
    loaded = load_svd(svd_folder, dtype=torch.float32, device="cpu", sgm_groupnorm_eps=False)
    assert loaded.latent_scale == pytest.approx(0.18215)
    cond = frame_conditioning(backend, clip[0], len(clip), generator=torch.Generator().manual_seed(0))
    x = backend.encode(clip)[None]
    assert torch.allclose(loaded.encode(clip), x, atol=1e-5)
    assert torch.allclose(loaded.image_embedding(clip[:1]), backend.image_embedding(clip[:1]), atol=1e-5)
    # save/load of the tiny UNet is not bitwise on CPU (DIFFUSERS_NOTES 6): compare with a tolerance
    assert torch.allclose(loaded.denoise(x, 3.0, cond), backend.denoise(x, 3.0, cond), atol=1e-4)


def test_folder_that_is_not_svd(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(ValueError, match="not a diffusers SVD folder: missing .*vae"):
        load_svd(tmp_path)


def test_folder_with_another_unet_class(tmp_path, svd_folder):
    import shutil
    shutil.copytree(svd_folder, tmp_path / "m")
    config = tmp_path / "m" / "unet" / "config.json"
    config.write_text(config.read_text().replace("UNetSpatioTemporalConditionModel", "UNet2DConditionModel"))
    with pytest.raises(ValueError, match="not SVD's"):
        load_svd(tmp_path / "m")


def test_pickle_checkpoint_is_refused(tmp_path):
    path = tmp_path / "svd.ckpt"
    path.write_bytes(b"\x80\x04not really")
    with pytest.raises(ValueError, match="pickle.*safetensors"):
        load_svd(path)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_svd(tmp_path / "nope.safetensors")
    path = tmp_path / "truncated.safetensors"
    save_file({"a": torch.zeros(100)}, path)
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(ValueError, match="truncated.safetensors is not a readable"):
        read_safetensors(path)


def test_checkpoint_that_is_not_svd(tmp_path):
    path = tmp_path / "sd15.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
               "first_stage_model.encoder.conv_in.weight": torch.zeros(128, 3, 3, 3)}, path)
    with pytest.raises(ValueError, match="sd15.safetensors is not a Stable Video Diffusion checkpoint"):
        load_svd(path)
