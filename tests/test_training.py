"""Motion-LoRA training (ALGORITHM.md section 4) on tiny random models."""

import json

import pytest
import torch

from i2vedit_core.backends import diffusers_lora
from i2vedit_core.lora import LoraSpec, clip_fingerprint
from i2vedit_core.tiny import synthetic_clip, tiny_backend
from i2vedit_core.training import (TrainingCancelled, TrainingSettings, cosine_interpolated_sigma, edm_weight,
                                   prepare_training_data, sample_sigma, train_motion_lora, training_size)


@pytest.fixture(scope="module")
def frames():
    return synthetic_clip(num_frames=2, height=64, width=64, seed=4)


def test_cosine_interpolated_sigmas_match_the_official_distribution():
    # OFFICIAL_CODE_NOTES 5 step 2 (measured on the official code): median ~0.71, 10th/90th percentiles
    # ~0.087 / 5.9, ln sigma mean -0.34 and std 1.71.
    u = torch.rand(100_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigma = cosine_interpolated_sigma(u)
    p10, p50, p90 = sigma.quantile(torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist()
    assert abs(p50 - 0.71) < 0.02 and abs(p10 - 0.087) < 0.004 and abs(p90 - 5.9) < 0.2
    assert abs(float(sigma.log().mean()) + 0.34) < 0.02 and abs(float(sigma.log().std()) - 1.71) < 0.02
    ends = cosine_interpolated_sigma(torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(ends, torch.tensor([700.0, 0.002], dtype=torch.float64))


def test_lognormal_option_and_edm_weight():
    settings = TrainingSettings(sigma_distribution="lognormal")
    gen = torch.Generator().manual_seed(0)
    logs = torch.tensor([sample_sigma(settings, gen) for _ in range(4000)]).log()
    assert abs(float(logs.mean()) - 0.7) < 0.08 and abs(float(logs.std()) - 1.6) < 0.08
    assert edm_weight(1.0) == 2.0 and edm_weight(0.5) == pytest.approx(5.0)
    with pytest.raises(ValueError, match="sigma_distribution"):
        TrainingSettings(sigma_distribution="uniform")


def test_training_size_keeps_aspect_and_never_upscales():
    assert training_size(576, 1024, 512 * 896) == (512, 896)
    assert training_size(1024, 576, 512 * 896) == (896, 512)
    assert training_size(64, 64, 512 * 896) == (64, 64)
    assert training_size(1080, 1920, 512 * 896) == (512, 896)


def test_training_data_and_conditioning(backend, frames):
    z0, cond = prepare_training_data(backend, frames, TrainingSettings())
    assert z0.shape == (1, 2, 4, 8, 8)
    # Fixed time-id order [fps_id, motion_bucket, noise_aug] (the official code swaps the last two).
    assert cond.time_ids.tolist() == [[6.0, 127.0, pytest.approx(0.02)]]
    torch.testing.assert_close(cond.image_latents[0, 1], z0[0, 0] / backend.latent_scale)
    torch.testing.assert_close(cond.image_embeds[:, 0], backend.image_embedding(frames[:1]))


def boosted_backend():
    """A tiny model whose random output is 4x too large, so most of the loss is learnable (a random tiny
    UNet's loss is otherwise mostly the irreducible noise term at small sigma)."""
    backend = tiny_backend(seed=0)
    with torch.no_grad():
        backend.unet.conv_out.weight.mul_(4.0), backend.unet.conv_out.bias.mul_(4.0)
    return backend


def test_training_lowers_the_loss(frames):
    backend = boosted_backend()
    steps = []
    result = train_motion_lora(backend, frames, TrainingSettings(steps=60, learning_rate=2e-3, seed=0),
                               progress=steps.append)
    losses = torch.tensor(result.losses)
    assert len(steps) == 60 and [s["step"] for s in steps] == list(range(60))
    assert [s["loss"] for s in steps] == result.losses and all(s["steps"] == 60 for s in steps)
    assert float(losses[-20:].mean()) < 0.8 * float(losses[:20].mean())
    backend.detach_lora()


def test_training_is_bit_reproducible_and_leaves_global_rng_alone(frames):
    settings = TrainingSettings(steps=4, learning_rate=1e-2, seed=7)
    backend = tiny_backend(seed=0)  # building it seeds the global RNG: capture the state after
    rng = torch.get_rng_state()
    first = train_motion_lora(backend, frames, settings)
    assert torch.equal(torch.get_rng_state(), rng)
    second = train_motion_lora(tiny_backend(seed=0), frames, settings)
    assert first.losses == second.losses and first.sigmas == second.sigmas
    assert all(torch.equal(v, second.lora.weights[k]) for k, v in first.lora.weights.items())
    other = train_motion_lora(tiny_backend(seed=0), frames, TrainingSettings(steps=4, learning_rate=1e-2, seed=8))
    assert other.sigmas != first.sigmas
    up = "diffusion_model.input_blocks.1.1.time_stack.0.attn1.to_q.lora_up.weight"
    assert first.lora.weights[up].abs().max() > 0  # training moved the zero-initialised up-projection
    meta = first.lora.metadata
    assert meta["source_fingerprint"] == clip_fingerprint(frames)
    assert json.loads(meta["training"])["steps"] == 4 and json.loads(meta["training_size"]) == [8, 8]


def test_cancel_stops_training_and_removes_the_adapter(frames):
    backend = tiny_backend(seed=0)
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(TrainingCancelled, match="cancelled at step 2 of 50"):
        train_motion_lora(backend, frames, TrainingSettings(steps=50, seed=0), cancel=cancel)
    assert len(calls) == 3 and not diffusers_lora.lora_layers(backend.unet)


def test_a_step_is_queued_before_the_previous_loss_is_read(frames):
    """The host reads step k's loss (which waits for the GPU) only after step k + 1 is queued: otherwise the
    GPU idles between steps while the host prepares the next one."""
    backend = tiny_backend(seed=0)
    events = []
    denoise = backend.denoise

    def recording_denoise(*args, **kwargs):
        events.append("denoise")
        return denoise(*args, **kwargs)

    backend.denoise = recording_denoise
    result = train_motion_lora(backend, frames, TrainingSettings(steps=3, seed=0),
                               progress=lambda p: events.append(f"loss {p['step']}"))
    assert events == ["denoise", "denoise", "loss 0", "denoise", "loss 1", "loss 2"]
    assert len(result.losses) == 3 and all(isinstance(x, float) for x in result.losses)
    backend.detach_lora()


def test_attn1_only_trains_only_attn1(frames):
    backend = tiny_backend(seed=0)
    result = train_motion_lora(backend, frames, TrainingSettings(steps=1, seed=0, lora=LoraSpec(rank=4,
                                                                                                attn1_only=True)))
    assert len(result.lora.module_paths) == 64 and all(".attn1." in p for p in result.lora.module_paths)
    assert len(backend.lora_parameters()) == 128


def test_gradient_checkpointing_gives_the_same_step(frames, monkeypatch):
    # Plain SGD: the weights move by the gradients themselves. Checkpointing recomputes in another order (fp32
    # rounding, ~1e-6 of the largest gradient), which AdamW's first steps amplify where a gradient is near zero.
    monkeypatch.setattr(torch.optim, "AdamW", lambda params, lr, **_: torch.optim.SGD(params, lr=lr))
    plain = train_motion_lora(tiny_backend(seed=0), frames, TrainingSettings(steps=2, learning_rate=1e-2, seed=3))
    backend = tiny_backend(seed=0)
    checkpointed = train_motion_lora(backend, frames,
                                     TrainingSettings(steps=2, learning_rate=1e-2, seed=3, gradient_checkpointing=True))
    assert not backend.unet.is_gradient_checkpointing  # restored after training
    torch.testing.assert_close(torch.tensor(checkpointed.losses), torch.tensor(plain.losses), rtol=1e-5, atol=0)
    key = "diffusion_model.output_blocks.5.1.time_stack.0.ff.net.2.lora_up.weight"
    torch.testing.assert_close(checkpointed.lora.weights[key], plain.lora.weights[key], rtol=1e-4, atol=1e-6)


def test_skip_interval_training_shows_the_temporal_layers_clip_0(frames, monkeypatch):
    """ALGORITHM 6 in training: every temporal attn1 of every training forward attends over 2F keys
    ([clip 0 ; own clip]), the clip-0 half from a base-model forward; the LoRA still trains."""
    from i2vedit_core.attention import AttentionController
    from i2vedit_core.inversion import InversionSettings, invert_clip
    backend = tiny_backend(seed=0)
    clip0 = invert_clip(backend, synthetic_clip(num_frames=2, height=64, width=64, seed=11), InversionSettings(steps=3))
    settings = TrainingSettings(steps=2, learning_rate=1e-2, seed=5)
    with pytest.raises(ValueError, match="clip0 must be the Inversion of source clip 0"):
        train_motion_lora(backend, frames, settings, clip0=object())
    plain = train_motion_lora(backend, frames, settings)
    seen = []
    with_clip0 = AttentionController._with_clip0_kv

    def spy(self, k, v, site):
        k2, v2 = with_clip0(self, k, v, site)
        seen.append((site.path, k.shape[2], k2.shape[2], k.requires_grad or k.grad_fn is not None))
        return k2, v2

    monkeypatch.setattr(AttentionController, "_with_clip0_kv", spy)
    skip = train_motion_lora(backend, frames, settings, clip0=clip0)
    assert len(seen) == 2 * 16 and len({path for path, *_ in seen}) == 16  # every temporal layer, every step
    assert all(own == 2 and total == 4 for _, own, total, _ in seen)  # F = 2 own keys + 2 of clip 0
    assert all(graph for *_, graph in seen)  # the clip's own keys carry the LoRA's gradient
    assert skip.sigmas == plain.sigmas  # same draws: only the attention differs
    assert all(torch.isfinite(torch.tensor(skip.losses)))
    up = "diffusion_model.input_blocks.1.1.time_stack.0.attn1.to_q.lora_up.weight"
    assert skip.lora.weights[up].abs().max() > 0
    backend.detach_lora()
