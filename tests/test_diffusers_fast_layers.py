"""The diffusers backend's faster layers (diffusers_fast_layers.py): set only around its UNet calls and their
recomputation, the same numbers as the UNet's own layers, and SVD's attn2 without its attention kernel."""

import contextlib

import pytest
import torch

from i2vedit_core.backends import diffusers_fast_layers
from i2vedit_core.backends.base import Conditioning
from i2vedit_core.geglu import GegluForward
from i2vedit_core.group_norm import GroupNormForward
from i2vedit_core.layer_norm import LayerNormForward
from i2vedit_core.lora import LoraSpec
from i2vedit_core.tiny import tiny_backend

FRAMES = 3


@pytest.fixture(scope="module")
def backend():
    return tiny_backend(seed=0)


def inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    cond = Conditioning(torch.randn(1, 1, 32, generator=gen), torch.randn(1, FRAMES, 4, 8, 8, generator=gen),
                        torch.tensor([[6.0, 127.0, 0.02]]))
    return torch.randn(1, FRAMES, 4, 8, 8, generator=gen), cond


def test_a_call_equals_the_unets_own_layers_and_leaves_the_unet_as_it_was(backend, monkeypatch):
    x, cond = inputs()
    cond = Conditioning(torch.randn(1, 1, backend.unet.config.cross_attention_dim), cond.image_latents, cond.time_ids)
    processors = {p: m.processor for p, m in backend.unet.named_modules() if hasattr(m, "set_processor")}
    fast = backend.denoise(x, 1.0, cond)
    assert {p: m.processor for p, m in backend.unet.named_modules() if hasattr(m, "set_processor")} == processors
    assert not any("forward" in m.__dict__ for m in backend.unet.modules() if isinstance(m, torch.nn.GroupNorm))
    monkeypatch.setattr(backend.fast_layers, "installed", contextlib.nullcontext)
    torch.testing.assert_close(fast, backend.denoise(x, 1.0, cond), rtol=0, atol=1e-6)


def test_attn2_runs_no_attention_kernel(backend, monkeypatch):
    x, cond = inputs()
    cond = Conditioning(torch.randn(1, 1, backend.unet.config.cross_attention_dim), cond.image_latents, cond.time_ids)
    inner_calls, shortcut_calls = [], []
    real_call = diffusers_fast_layers.OneKeyAttnProcessor.__call__

    def counting(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        shortcut_calls.append(1)
        inner = self.inner
        self.inner = lambda *a, **k: inner_calls.append(1) or inner(*a, **k)
        try:
            return real_call(self, attn, hidden_states, encoder_hidden_states, *args, **kwargs)
        finally:
            self.inner = inner

    monkeypatch.setattr(diffusers_fast_layers.OneKeyAttnProcessor, "__call__", counting)
    backend.denoise(x, 1.0, cond)
    attn2 = len(backend.fast_layers.attn2)
    assert attn2 == 2 * len([p for p, _ in backend.unet.named_modules() if p.endswith("transformer_blocks.0.attn1")
                             and "temporal" not in p])
    assert len(shortcut_calls) == attn2 and not inner_calls


def test_a_checkpointed_recomputation_runs_the_calls_fast_layers(backend, monkeypatch):
    """Backward runs after the call took the fast layers off: the recomputation sets them again (GroupNorm,
    LayerNorm and GEGLU forwards)."""
    x, cond = inputs()
    cond = Conditioning(torch.randn(1, 1, backend.unet.config.cross_attention_dim), cond.image_latents, cond.time_ids)
    calls = {kind: [] for kind in (GroupNormForward, LayerNormForward, GegluForward)}
    for kind, record in calls.items():
        real = kind.__call__
        monkeypatch.setattr(kind, "__call__", lambda self, x, *a, _real=real, _record=record, **k:
                            _record.append(torch.is_grad_enabled()) or _real(self, x, *a, **k))
    backend.attach_lora(LoraSpec(rank=2), torch.Generator().manual_seed(0))
    try:
        with backend.lora_training(True):
            out = backend.denoise(x, 1.0, cond)
            during_call = {kind: len(record) for kind, record in calls.items()}
            out.square().mean().backward()
        for kind, record in calls.items():  # recomputed in backward with the same forwards
            assert during_call[kind] > 0 and len(record) > during_call[kind], kind.__name__
    finally:
        backend.detach_lora()


def test_other_processors_and_forwards_set_on_the_unet_are_left_alone(backend):
    """An IP-Adapter-like processor (an nn.Module) on an attn2, and a forward an offloading hook set on a GroupNorm,
    stay what they are during the call and after it."""
    x, cond = inputs()
    cond = Conditioning(torch.randn(1, 1, backend.unet.config.cross_attention_dim), cond.image_latents, cond.time_ids)
    attn2 = backend.fast_layers.attn2[0][0]
    norm = backend.fast_layers.norms[0][0]
    seen = []

    class ModuleProcessor(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, attn, hidden_states, *args, **kwargs):
            seen.append("processor")
            return self.inner(attn, hidden_states, *args, **kwargs)

    def hooked(input, norm=norm):
        seen.append("norm")
        return torch.nn.GroupNorm.forward(norm, input)

    original = attn2.processor
    attn2.set_processor(ModuleProcessor(original))
    norm.forward = hooked
    try:
        mine = attn2.processor
        backend.denoise(x, 1.0, cond)
        assert seen.count("processor") == 1 and seen.count("norm") >= 1
        assert attn2.processor is mine and norm.__dict__["forward"] is hooked
    finally:
        attn2.set_processor(original)
        del norm.forward
