"""Processors on the diffusers UNet: installed only inside use_attention, sites and layouts right."""

import pytest
import torch
import torch.nn.functional as F

from i2vedit_core.attention import AttentionController
from i2vedit_core.backends.diffusers_attention import attn1_sites, use_attention
from i2vedit_core.conditioning import latent_conditioning


def _inputs(frames=3, videos=1):
    g = torch.Generator().manual_seed(0)
    cond = latent_conditioning(torch.randn(1, 32, generator=g), torch.randn(1, 4, 8, 8, generator=g), frames)
    cond = type(cond).cat(*[cond] * videos)
    return torch.randn(videos, frames, 4, 8, 8, generator=g), cond


class _Recorder:
    def __init__(self, rows):
        self.rows, self.calls = rows, []

    def __call__(self, q, k, v, site):
        self.calls.append((site, tuple(q.shape)))
        return F.scaled_dot_product_attention(q, k, v)


def test_sites_downscale_factors(backend):
    sites = attn1_sites(backend.unet)
    assert sum(s.kind == "spatial" for s in sites) == 16 and sum(s.kind == "temporal" for s in sites) == 16
    factors = {s.path.split(".transformer_blocks")[0].split(".temporal_transformer_blocks")[0]: s.downscale
               for s in sites}
    assert factors["down_blocks.0.attentions.1"] == 1 and factors["down_blocks.1.attentions.0"] == 2
    assert factors["down_blocks.2.attentions.1"] == 4 and factors["mid_block.attentions.0"] == 8
    assert factors["up_blocks.1.attentions.2"] == 4 and factors["up_blocks.3.attentions.0"] == 1


def test_every_attn1_call_reaches_the_controller_with_its_layout(backend):
    x, cond = _inputs(frames=3, videos=2)
    recorder = _Recorder(("uncond", "cond"))
    reference = backend.denoise(x, 5.0, cond)
    out = backend.denoise(x, 5.0, cond, attention=recorder)
    torch.testing.assert_close(out, reference, atol=1e-6, rtol=0)
    assert len(recorder.calls) == 32 and len({s.path for s, _ in recorder.calls}) == 32
    for site, shape in recorder.calls:
        grid = {1: (8, 8), 2: (4, 4), 4: (2, 2), 8: (1, 1)}[site.downscale]
        assert site.layout.rows == ("uncond", "cond") and site.layout.frames == 3 and site.layout.grid == grid
        assert site.layout.tokens == grid[0] * grid[1]
        assert shape[0] == (2 * 3 if site.kind == "spatial" else 2 * site.layout.tokens)


def test_processors_are_restored_even_after_an_error(backend):
    originals = {s.path: backend.unet.get_submodule(s.path).processor for s in attn1_sites(backend.unet)}
    x, cond = _inputs()
    with pytest.raises(ValueError, match="2 videos"):
        backend.denoise(x, 5.0, cond, attention=_Recorder(("uncond", "cond")))
    with use_attention(backend.unet, _Recorder(("cond",))):
        assert all(type(backend.unet.get_submodule(p).processor).__name__ == "ControlledAttnProcessor"
                   for p in originals)
    assert all(backend.unet.get_submodule(p).processor is proc for p, proc in originals.items())
    assert len(backend.unet.attn_processors) == 64


def test_plain_pass_equals_the_uncontrolled_model(backend):
    x, cond = _inputs()
    controller = AttentionController()
    out = backend.denoise(x, 5.0, cond, attention=controller.plain_pass(("cond",)))
    torch.testing.assert_close(out, backend.denoise(x, 5.0, cond), atol=1e-6, rtol=0)
