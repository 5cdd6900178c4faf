"""The memory policy (memory.py): tiers, auto, budgets, the checkpoint set and what the pipeline runs with."""

import pytest
import torch

from i2vedit_core.inversion import InversionSettings, invert_clip
from i2vedit_core.memory import (GIB, MemoryPolicy, checkpointed_layers, layers_text, next_lower, parse_layers,
                                 plan_of)
from i2vedit_core.pipeline import PipelineSettings, memory_plan, with_plan
from i2vedit_core.tiny import synthetic_clip, tiny_backend
from i2vedit_core.training import TrainingSettings, train_motion_lora


def test_tiers_lower_the_peak_step_by_step():
    fast, mid, low = plan_of("fast"), plan_of("24gb"), plan_of("12gb")
    assert (fast.checkpointing, fast.decode_chunk, fast.offload) == (False, 8, False)
    assert (mid.checkpointing, mid.decode_chunk, mid.offload) == (parse_layers("0,1t,2t,3"), 4, False)
    levels = [checkpointed_layers(4, plan.checkpointing) for plan in (fast, mid, low)]
    assert levels[0] < levels[1] < levels[2]
    assert str(mid) == ("memory 24gb: training recomputes 0,1t,2t,3; decode 4 frames a call; VAE and CLIP resident; "
                        "compile off")
    assert (low.checkpointing, low.decode_chunk, low.offload) == (True, 2, True)
    assert [next_lower(t) for t in ("fast", "24gb", "12gb")] == ["24gb", "12gb", None]


def test_auto_reads_free_memory_and_budgets_pick_a_tier():
    assert MemoryPolicy().plan("cpu").tier == "fast"  # no VRAM to save on a CPU
    cuda = torch.device("cuda", 0)
    assert [MemoryPolicy("auto").plan(cuda, lambda: gib * GIB).tier for gib in (80, 31.9, 20, 19.9, 11)] == \
        ["fast", "24gb", "24gb", "12gb", "12gb"]
    assert [MemoryPolicy(gib).plan().tier for gib in (48, 24, 16, 8)] == ["fast", "24gb", "12gb", "12gb"]
    assert MemoryPolicy("24gb").plan(cuda, lambda: 80 * GIB).tier == "24gb"  # a tier is taken as given
    assert MemoryPolicy("16GB").setting == 16.0
    with pytest.raises(ValueError, match="memory must be one of auto, fast, 24gb, 12gb"):
        MemoryPolicy("huge")


def test_checkpoint_set_counts_levels_from_the_finest():
    both = ("resblock", "transformer")
    assert checkpointed_layers(4, False) == frozenset()
    assert checkpointed_layers(4, 2) == {(level, kind) for level in (0, 1) for kind in both}
    assert checkpointed_layers(4, True) == {(level, kind) for level in range(4) for kind in both}
    assert checkpointed_layers(4, 9) == checkpointed_layers(4, True)
    assert checkpointed_layers(4, [(2, "resblock")]) == {(2, "resblock")}
    with pytest.raises(ValueError, match="level in 0..3"):
        checkpointed_layers(4, [(4, "resblock")])
    with pytest.raises(ValueError, match="kind in"):
        checkpointed_layers(4, [(0, "attention")])


def test_checkpoint_notation_round_trips():
    assert parse_layers("none") is False and parse_layers("0") is False and parse_layers("all") is True
    assert parse_layers("3") == 3  # a count of the finest levels, as the tiers name them
    assert parse_layers("0,1,2r") == {(0, "resblock"), (0, "transformer"), (1, "resblock"), (1, "transformer"),
                                      (2, "resblock")}
    assert parse_layers(" 3t ") == {(3, "transformer")}
    for text in ("0,1,2r", "1t,2,3r", "0r,0t"):
        assert parse_layers(layers_text(parse_layers(text))) == parse_layers(text)
    assert layers_text(parse_layers("0r,0t")) == "0r,0t" and layers_text(parse_layers("0,1r")) == "0,1r"
    assert layers_text(frozenset()) == "none"
    with pytest.raises(ValueError, match="as in 0,1,2r"):
        parse_layers("0,1x")


def test_pipeline_settings_follow_the_plan():
    backend = tiny_backend(seed=0)
    settings = PipelineSettings(memory="12gb")
    resolved = with_plan(settings, memory_plan(backend, settings))
    assert resolved.training.gradient_checkpointing is True and resolved.memory == MemoryPolicy("12gb")
    assert not backend.offload  # offloading is a GPU matter: a CPU backend keeps everything in place
    assert with_plan(PipelineSettings(training=None), plan_of("12gb")).training is None
    auto = PipelineSettings()
    assert with_plan(auto, memory_plan(backend, auto)).memory == MemoryPolicy("fast")


def test_both_backends_checkpoint_the_same_layers():
    """The diffusers backend wraps the ResBlocks and transformers of exactly the (level, kind) pairs the plan
    names, and every module of a chosen pair."""
    from i2vedit_core.backends.diffusers_checkpointing import checkpointing, heavy_layers

    backend = tiny_backend(seed=0)
    layers = heavy_layers(backend.unet)
    assert {kind for _, kind in layers} == {"resblock", "transformer"} and all(layers.values())
    for setting in (False, 1, True, parse_layers("0r,1t")):
        with checkpointing(backend.unet, setting):
            wrapped = {layer for layer, modules in layers.items() for m in modules if "forward" in vars(m)}
            partial = [layer for layer, modules in layers.items()
                       if 0 < sum("forward" in vars(m) for m in modules) < len(modules)]
        assert wrapped == checkpointed_layers(len(backend.unet.down_blocks), setting) and not partial
        assert not any("forward" in vars(m) for m in backend.unet.modules())


@pytest.mark.parametrize("levels", [1, True, parse_layers("0t,1r")])
def test_checkpointed_skip_interval_training_matches_plain(levels, monkeypatch):
    """Backward re-runs checkpointed temporal attention: the clip-0 K/V must still be there. Plain SGD, so the
    weights move by the gradients themselves (test_training: AdamW amplifies fp32 rounding near zero)."""
    monkeypatch.setattr(torch.optim, "AdamW", lambda params, lr, **_: torch.optim.SGD(params, lr=lr))
    frames = synthetic_clip(3, 64, 64, seed=4)
    results = []
    for checkpointing in (False, levels):
        backend = tiny_backend(seed=0)
        clip0 = invert_clip(backend, synthetic_clip(3, 64, 64, seed=11), InversionSettings(steps=2))
        settings = TrainingSettings(steps=2, learning_rate=1e-2, seed=5, gradient_checkpointing=checkpointing)
        results.append(train_motion_lora(backend, frames, settings, clip0=clip0))
        assert not any("forward" in vars(m) for m in backend.unet.modules()), "checkpoint wrappers left behind"
    plain, checkpointed = results
    torch.testing.assert_close(torch.tensor(checkpointed.losses), torch.tensor(plain.losses), rtol=1e-5, atol=0)
    key = "diffusion_model.input_blocks.1.1.time_stack.0.attn1.to_k.lora_up.weight"
    torch.testing.assert_close(checkpointed.lora.weights[key], plain.lora.weights[key], rtol=1e-4, atol=1e-6)
