"""The `official` numerics preset (issue 12): every setting value by value, the CLI flag builds the same
settings, and the pieces it switches on compute what the official code computes."""

import pytest
import torch

from i2vedit_core.attention.matching import threshold_ramp
from i2vedit_core.attention.temporal import TemporalSelector
from i2vedit_core.cli import build_parser, settings_from
from i2vedit_core.conditioning import eight_bit
from i2vedit_core.pipeline import PipelineSettings
from i2vedit_core.presets import edit_with_numerics, inversion_numerics, numerics_of, with_numerics


def test_official_preset_value_by_value():
    base = PipelineSettings()
    official = with_numerics(base, "official")
    assert official.edit.source_step_offset == 1
    assert official.edit.matching.temporal.stage2_exceptions == ("up_blocks.1.attentions.2.",)
    assert official.edit.matching.official_ramp is True
    assert official.inversion.cond_8bit is True
    assert official.inversion.vae_sample is True
    # Nothing else moves: the user's choices (betas, thresholds, guidance, seeds, steps) are kept.
    assert (official.edit.matching.temporal.beta1, official.edit.matching.temporal.beta2) == (0.5, 0.8)
    assert official.edit.matching.thresholds == base.edit.matching.thresholds
    assert (official.edit.min_guidance, official.edit.max_guidance, official.edit.seed) == (1.0, 2.5, 0)
    assert official.inversion.steps == 25 and official.inversion.micro.fps_id == 8
    assert official.training == base.training and official.micro == base.micro
    # The defaults are ours (docs/FIDELITY.md), and the preset round-trips.
    assert base.edit.source_step_offset == 0 and base.edit.matching.temporal.stage2_exceptions == ()
    assert not (base.edit.matching.official_ramp or base.inversion.cond_8bit or base.inversion.vae_sample)
    assert with_numerics(official, "default") == base and numerics_of(base) == "default"
    assert numerics_of(official) == "official"
    assert with_numerics(PipelineSettings(), "default") == base
    with pytest.raises(ValueError, match="official"):
        with_numerics(base, "paper")



def test_official_on_a_host_without_a_posterior_draw():
    """ComfyUI's VAE gives the posterior mode: there "official" is every official choice but vae_sample, and
    the edits of an inversion follow the numerics it was made with (the nodes' one widget)."""
    base = PipelineSettings()
    host = with_numerics(base, "official", posterior_sample=False)
    assert host.inversion.cond_8bit is True and host.inversion.vae_sample is False
    assert host.edit == with_numerics(base, "official").edit == edit_with_numerics(base.edit, "official")
    assert inversion_numerics(host.inversion) == "official" and inversion_numerics(base.inversion) == "default"
    assert edit_with_numerics(host.edit, "default") == base.edit


def test_cli_flag_builds_the_same_settings():
    args = build_parser().parse_args(["--numerics", "official", "--preset", "style"])
    expected = with_numerics(settings_from(build_parser().parse_args(["--preset", "style"])), "official")
    assert settings_from(args) == expected
    assert expected.edit.matching.temporal.beta1 == 0.8  # the temporal preset is kept
    assert numerics_of(settings_from(build_parser().parse_args([]))) == "default"


def test_official_threshold_ramp_is_f_over_F():
    official = threshold_ramp((0.2, 0.6), 4, official=True)
    torch.testing.assert_close(official, torch.tensor([0.2, 0.3, 0.4, 0.5]))
    torch.testing.assert_close(threshold_ramp((0.2, 0.6), 5), torch.tensor([0.2, 0.3, 0.4, 0.5, 0.6]))


def test_eight_bit_truncates_like_the_official_uint8_cast():
    levels = torch.tensor([0.0, 1.0, 127.0, 254.0, 255.0]) / 127.5 - 1
    x = torch.stack([levels - 1e-3, levels + 1e-3, levels])
    out = (eight_bit(x) + 1) * 127.5
    # Just below a level truncates to the level under it; just above stays; negatives clip at 0.
    assert out.round().tolist()[1] == [0.0, 1.0, 127.0, 254.0, 255.0]
    assert out.round().tolist()[0][1:] == [0.0, 126.0, 253.0, 254.0]


def test_stage2_exception_only_under_the_official_selector():
    official = TemporalSelector(0.2, 0.8, ("up_blocks.1.attentions.2.",))
    path = "up_blocks.1.attentions.2.temporal_transformer_blocks.0.attn1"
    assert official.uses_source(10, 25, 4, path) is False
    assert TemporalSelector(0.2, 0.8).uses_source(10, 25, 4, path) is True


def test_official_inversion_inputs(backend, clip):
    from i2vedit_core.inversion import InversionSettings, invert_clip

    ours = invert_clip(backend, clip[:3], InversionSettings(steps=2))
    official = invert_clip(backend, clip[:3], InversionSettings(steps=2, cond_8bit=True, vae_sample=True))
    again = invert_clip(backend, clip[:3], InversionSettings(steps=2, cond_8bit=True, vae_sample=True))
    torch.testing.assert_close(again.latents, official.latents, rtol=0, atol=0)  # seeded: reproducible
    start_gap = float((official.latents[0] - ours.latents[0]).abs().max())
    assert 1e-3 < start_gap  # a posterior sample, not the mode
    lat = official.cond.image_latents[0]
    assert not torch.equal(lat[0], lat[1]) and torch.equal(lat[1], lat[2])  # key at frame 0, first copy after

