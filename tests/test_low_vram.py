"""Low-VRAM mode: the same numbers with every transformer block recomputed in backward."""

import torch

from i2vedit_core.inversion import InversionSettings, invert_clip
from i2vedit_core.pipeline import PipelineSettings
from i2vedit_core.tiny import synthetic_clip, tiny_backend
from i2vedit_core.training import TrainingSettings, train_motion_lora


def test_low_vram_switches_on_checkpointing_and_small_decode_chunks():
    settings = PipelineSettings(low_vram=True).resolved()
    assert settings.training.gradient_checkpointing and settings.decode_chunk == 2
    assert PipelineSettings().resolved() == PipelineSettings()
    assert PipelineSettings(low_vram=True, training=None).resolved().training is None


def test_checkpointed_skip_interval_training_matches_plain():
    """Backward re-runs checkpointed temporal attention: the clip-0 K/V must still be there."""
    frames = synthetic_clip(3, 64, 64, seed=4)
    results = []
    for checkpointing in (False, True):
        backend = tiny_backend(seed=0)
        clip0 = invert_clip(backend, synthetic_clip(3, 64, 64, seed=11), InversionSettings(steps=2))
        settings = TrainingSettings(steps=2, learning_rate=1e-2, seed=5, gradient_checkpointing=checkpointing)
        results.append(train_motion_lora(backend, frames, settings, clip0=clip0))
        assert not any("forward" in vars(m) for m in backend.unet.modules()), "checkpoint wrappers left behind"
    plain, checkpointed = results
    torch.testing.assert_close(torch.tensor(checkpointed.losses), torch.tensor(plain.losses), rtol=1e-5, atol=0)
    key = "diffusion_model.input_blocks.1.1.time_stack.0.attn1.to_k.lora_up.weight"
    torch.testing.assert_close(checkpointed.lora.weights[key], plain.lora.weights[key], rtol=1e-4, atol=1e-6)
