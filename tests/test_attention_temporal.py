"""Temporal selector: which temporal layers use the source probabilities at each of 25 steps."""

import pytest
import torch

from i2vedit_core.attention import AttentionController, MatchSettings, TemporalSelector
from i2vedit_core.backends.diffusers_attention import attn1_sites

STAGE2 = {"down_blocks.2.attentions.0", "down_blocks.2.attentions.1", "mid_block.attentions.0",
          "up_blocks.1.attentions.0", "up_blocks.1.attentions.1", "up_blocks.1.attentions.2"}
# (steps using source everywhere, steps using it in the downscale >= 4 layers only), from OFFICIAL_CODE_NOTES §4b.
TABLE = {"local": (range(0, 12), range(12, 20)), "style": (range(0, 20), range(20, 22)),
         "shape": (range(0, 10), range(10, 12))}


def _block(path):
    return path.split(".temporal_transformer_blocks")[0]


@pytest.mark.parametrize("preset", sorted(TABLE))
@pytest.mark.parametrize("official", [False, True])
def test_preset_table_over_25_steps(backend, preset, official):
    selector = TemporalSelector.preset(preset, official_exceptions=official)
    temporal = [s for s in attn1_sites(backend.unet) if s.kind == "temporal"]
    assert len(temporal) == 16
    stage1, stage2 = TABLE[preset]
    stage2_blocks = STAGE2 - ({"up_blocks.1.attentions.2"} if official else set())
    for step in range(25):
        used = {_block(s.path) for s in temporal if selector.uses_source(step, 25, s.downscale, s.path)}
        if step in stage1:
            assert len(used) == 16, step
        elif step in stage2:
            assert used == stage2_blocks, step
        else:
            assert used == set(), step


def test_bad_betas_and_presets_name_the_fix():
    with pytest.raises(ValueError, match="beta1 > beta2"):
        TemporalSelector(0.8, 0.5)
    with pytest.raises(ValueError, match="local"):
        TemporalSelector.preset("huge")


def test_unet_forward_uses_source_probabilities_exactly_in_the_selected_layers(backend):
    """Stage 2 at every step ([0, 1]): through the real UNet only the six downscale >= 4 layers copy."""
    controller = AttentionController(MatchSettings(temporal=TemporalSelector(0.0, 1.0), match_spatial=False))
    x = torch.randn(1, 3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = _cond(backend, frames=3)
    controller.begin_step(5)
    backend.denoise(x, 10.0, cond, attention=controller.source_pass(), lora_scale=0.0)
    assert {_block(p) for p in controller.buffer.probs} == STAGE2
    backend.denoise(torch.cat([x, x]), 10.0, type(cond).cat(cond.zeros_like(), cond),
                    attention=controller.edit_pass())
    assert {_block(p) for p in controller.buffer.temporal_source} == STAGE2
    assert not controller.buffer.masks  # spatial matching off


def _cond(backend, frames):
    from i2vedit_core.conditioning import latent_conditioning
    g = torch.Generator().manual_seed(1)
    return latent_conditioning(torch.randn(1, 32, generator=g), torch.randn(1, 4, 8, 8, generator=g), frames)
