"""Habits of the seam (issue 15 item 6): identity() for cache keys, CPU random draws, the flash fallback."""

import pytest
import torch
import torch.nn.functional as F

from i2vedit_core import stages
from i2vedit_core.attention import fused
from i2vedit_core.backends.base import SVDBackend
from i2vedit_core.conditioning import MicroConditioning, latent_conditioning, with_latent_noise
from i2vedit_core.sarp import SARP_THRESHOLD, perturb_smooth_areas, smooth_area_mask
from i2vedit_core.tiny import synthetic_clip


class NoIdentity:
    device, latent_scale = torch.device("cpu"), 0.18215

    def encode(self, frames, chunk_size=8): ...
    def decode(self, latents, chunk_size=8): ...
    def image_embedding(self, frames): ...
    def denoise(self, x, sigma, cond, attention=None, lora_scale=1.0): ...


def test_a_backend_without_identity_is_refused_by_the_cache_not_keyed_by_id():
    assert not isinstance(NoIdentity(), SVDBackend)  # identity() is part of the protocol
    with pytest.raises(TypeError, match=r"has no identity\(\).*SVDBackend.identity\(\)"):
        stages.model_identity(NoIdentity())
    with_identity = type("WithIdentity", (NoIdentity,), {"identity": lambda self: "weights-abc"})()
    assert isinstance(with_identity, SVDBackend) and stages.model_identity(with_identity) == "weights-abc"


def test_every_random_draw_of_a_run_comes_from_a_cpu_generator(backend, monkeypatch):
    from i2vedit_core.editing import EditSettings, edit_clip
    from i2vedit_core.inversion import InversionSettings, invert_clip
    from i2vedit_core.training import TrainingSettings, train_motion_lora

    created, real = [], torch.Generator

    def recording(*args, **kwargs):
        generator = real(*args, **kwargs)
        created.append(generator.device)
        return generator

    monkeypatch.setattr(torch, "Generator", recording)
    clip = synthetic_clip(num_frames=2, height=64, width=64, seed=1)
    inversion = invert_clip(backend, clip, InversionSettings(steps=2, seed=3))
    edit_clip(backend, inversion, inversion.cond, EditSettings(seed=4), lora_scale=0.0)
    train_motion_lora(backend, clip, TrainingSettings(steps=1, seed=5))
    backend.detach_lora()
    assert len(created) >= 3 and {d.type for d in created} == {"cpu"}, created


def test_seeded_noise_is_the_cpu_draw_moved_to_the_frames_device():
    frames = synthetic_clip(num_frames=2, height=64, width=64, seed=2)
    cond = latent_conditioning(torch.zeros(1, 8), torch.zeros(1, 4, 8, 8), 2, MicroConditioning())
    noisy = with_latent_noise(cond, 0.5, torch.Generator().manual_seed(7))
    expected = 0.5 * torch.randn((1, 1, 4, 8, 8), generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(noisy.image_latents[:, :1], expected, rtol=0, atol=0)
    with pytest.raises(RuntimeError):  # a generator on another device is refused, not silently used
        with_latent_noise(cond, 0.5, torch.Generator(device="meta"))
    noise = torch.randn(frames.shape, generator=torch.Generator().manual_seed(0))
    expected = (frames + 0.1 * noise * smooth_area_mask(frames, SARP_THRESHOLD)).clamp(-1, 1)
    torch.testing.assert_close(perturb_smooth_areas(frames, 0.1, generator=torch.Generator().manual_seed(0)), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to compare devices")
def test_same_seed_same_noise_on_cpu_and_cuda():
    frames = synthetic_clip(num_frames=2, height=64, width=64, seed=2)
    on_cpu = perturb_smooth_areas(frames, 0.1, generator=torch.Generator().manual_seed(0))
    on_gpu = perturb_smooth_areas(frames.cuda(), 0.1, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=0, atol=1e-6)
    cond = latent_conditioning(torch.zeros(1, 8), torch.zeros(1, 4, 8, 8), 2, MicroConditioning())
    gpu_cond = latent_conditioning(torch.zeros(1, 8).cuda(), torch.zeros(1, 4, 8, 8).cuda(), 2, MicroConditioning())
    a = with_latent_noise(cond, 0.5, torch.Generator().manual_seed(7)).image_latents
    b = with_latent_noise(gpu_cond, 0.5, torch.Generator().manual_seed(7)).image_latents
    torch.testing.assert_close(b.cpu(), a, rtol=0, atol=0)


def test_the_first_kernel_that_accepts_gives_the_lse_and_out_of_memory_propagates():
    q = torch.randn(1, 2, 4, 8)

    def refuses(*args):
        raise RuntimeError("No available kernel\nmore detail")

    def accepts(*args):
        return q * 2, q[..., 0], None

    def out_of_memory(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    out, lse = fused.first_with_lse((refuses, accepts), q, q, q)
    assert torch.equal(out, q * 2) and torch.equal(lse, q[..., 0])
    assert fused.first_with_lse((refuses, refuses), q, q, q) is None
    with pytest.raises(torch.cuda.OutOfMemoryError, match="20.00 GiB"):
        fused.first_with_lse((out_of_memory, accepts), q, q, q)


def test_controlled_attention_is_plain_sdpa_off_cuda():
    q, k, v = (torch.randn(2, 3, 16, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    torch.testing.assert_close(fused.sdpa(q, k, v), F.scaled_dot_product_attention(q, k, v), rtol=0, atol=0)
    out, lse = fused.attention_with_lse(q, k, v)
    assert lse is None and torch.equal(out, F.scaled_dot_product_attention(q, k, v))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused kernels run on CUDA")
@pytest.mark.parametrize("kernel", ["cudnn_kernel", "flash_kernel"])
def test_each_fused_kernel_gives_softmax_attention_and_its_natural_log_lse(kernel):
    gen = torch.Generator("cuda").manual_seed(0)
    q, k, v = (torch.randn(3, 5, 300, 64, generator=gen, device="cuda", dtype=torch.float16) for _ in range(3))
    logits = q.float() @ k.float().transpose(-1, -2) * 64 ** -0.5
    try:
        out, lse = getattr(fused, kernel)(q, k, v)
    except RuntimeError as error:
        pytest.skip(f"{kernel} refuses on this GPU: {error}")
    assert lse.shape == (3, 5, 300)
    torch.testing.assert_close(lse.float(), logits.logsumexp(-1), rtol=0, atol=1e-3)
    torch.testing.assert_close(out.float(), logits.softmax(-1) @ v.float(), rtol=0, atol=2e-3)


def test_twins_head_split_downscale_and_reattach_rule():
    from i2vedit_core.backends import twins
    from i2vedit_core.lora import LoraSpec
    x = torch.arange(2 * 3 * 8, dtype=torch.float32).view(2, 3, 8)
    heads = twins.split_heads(x, 2)
    assert heads.shape == (2, 2, 3, 4) and torch.equal(heads[1, 1, 2], x[1, 2, 4:])
    assert torch.equal(twins.merge_heads(heads, torch.float64), x.double())
    assert [twins.downscale("down", level, 4) for level in range(4)] == [1, 2, 4, 8]
    assert [twins.downscale("up", level, 4) for level in range(4)] == [8, 4, 2, 1]
    assert twins.downscale("mid", 0, 4) == 8
    spec = LoraSpec(rank=4)
    assert twins.needs_fresh_adapter(None, spec) and not twins.needs_fresh_adapter(spec, LoraSpec(rank=4))
    assert twins.needs_fresh_adapter(spec, LoraSpec(rank=2)) and twins.needs_fresh_adapter(spec, LoraSpec(rank=4, dropout=0.0))
    a = twins.lora_down_init((4, 6), 4, twins.lora_generator(None))
    torch.testing.assert_close(a, torch.randn((4, 6), generator=torch.Generator().manual_seed(0)) / 4, rtol=0, atol=0)
