"""The torch.compile lever of motion-LoRA training and the diffusers LoRA-dtype lever, on the CPU.

The GPU path compiles with inductor (docs/PERFORMANCE.md has its measured cost and saving); here the
same wiring runs with dynamo's "eager" backend: the steps go through one captured graph, with no
graph break, and give the eager numbers.
"""

import dataclasses

import pytest
import torch

from i2vedit_core.backends import diffusers_lora
from i2vedit_core.lora import LoraSpec
from i2vedit_core.memory import MemoryPlan, plan_of
from i2vedit_core.pipeline import PipelineSettings, with_plan
from i2vedit_core.tiny import synthetic_clip, tiny_backend
from i2vedit_core.training import TrainingSettings, compile_backend, train_motion_lora


def test_compile_setting_resolves_per_device(monkeypatch):
    from i2vedit_core import training

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(training, "_triton_runs_on", lambda device: True)
    assert compile_backend(True, cuda) == "inductor" and compile_backend(True, cpu) is None
    monkeypatch.setattr(training, "_triton_runs_on", lambda device: False)
    assert compile_backend(True, cuda) is None  # no Triton (many Windows installs): eager, not an error
    assert compile_backend("aot_eager", cpu) == "aot_eager" and compile_backend("eager", cuda) == "eager"
    assert compile_backend(False, cuda) is None and compile_backend(None, cuda) is None
    for bad in ("", 1.5, 0):
        with pytest.raises(ValueError, match="compile must be"):
            TrainingSettings(compile=bad)


def test_the_memory_plan_decides_unless_training_names_it():
    on = MemoryPlan("fast", False, 8, False, compile=True)
    assert with_plan(PipelineSettings(), on).training.compile is True
    assert with_plan(PipelineSettings(), plan_of("fast")).training.compile is False
    explicit = PipelineSettings(training=TrainingSettings(compile="eager"))
    assert with_plan(explicit, on).training.compile == "eager"
    assert with_plan(PipelineSettings(training=TrainingSettings(compile=False)), on).training.compile is False


def test_compiled_training_is_one_graph_and_equals_eager():
    from torch._dynamo.utils import counters

    frames = synthetic_clip(num_frames=2, height=64, width=64, seed=4)
    settings = TrainingSettings(steps=2, learning_rate=1e-2, seed=3)
    plain = train_motion_lora(tiny_backend(seed=0), frames, settings)
    backend = tiny_backend(seed=0)
    torch._dynamo.reset()
    counters.clear()
    compiled = train_motion_lora(backend, frames, dataclasses.replace(settings, compile="eager"))
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]  # traced, whole
    assert backend.unet._compiled_call_impl is None  # eager again after training
    assert compiled.losses == plain.losses
    assert all(torch.equal(v, plain.lora.weights[k]) for k, v in compiled.lora.weights.items())


def test_a_failing_compiler_falls_back_to_eager_with_the_same_numbers():
    """A compiler error in the first step (no working Triton, say) must not lose the run: a warning, then
    the eager steps from the same random state."""
    from torch._dynamo import register_backend

    @register_backend(name="i2vedit_test_broken")
    def broken(graph, example_inputs):
        raise RuntimeError("no working toolchain here")

    frames = synthetic_clip(num_frames=2, height=64, width=64, seed=4)
    settings = TrainingSettings(steps=2, learning_rate=1e-2, seed=3)
    plain = train_motion_lora(tiny_backend(seed=0), frames, settings)
    backend = tiny_backend(seed=0)
    torch._dynamo.reset()
    with pytest.warns(UserWarning, match="no working toolchain.*compile=False"):
        result = train_motion_lora(backend, frames, dataclasses.replace(settings, compile="i2vedit_test_broken"))
    assert result.losses == plain.losses and result.sigmas == plain.sigmas
    assert all(torch.equal(v, plain.lora.weights[k]) for k, v in result.lora.weights.items())


def test_a_failing_backward_compiler_is_caught_in_the_first_step():
    """The backward is compiled with the forward in the first step, so its failure falls back to eager too
    (compiled lazily, it would surface at loss.backward() as a plain error and lose the run)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo import register_backend
    from torch._dynamo.backends.common import aot_autograd

    def backward_fails(graph, example_inputs):
        raise RuntimeError("no kernel for the backward")

    register_backend(aot_autograd(fw_compiler=lambda g, _: make_boxed_func(g.forward), bw_compiler=backward_fails),
                     name="i2vedit_test_broken_backward")
    frames = synthetic_clip(num_frames=2, height=64, width=64, seed=4)
    settings = TrainingSettings(steps=2, learning_rate=1e-2, seed=3)
    plain = train_motion_lora(tiny_backend(seed=0), frames, settings)
    torch._dynamo.reset()
    with pytest.warns(UserWarning, match="no kernel for the backward"):
        result = train_motion_lora(tiny_backend(seed=0), frames,
                                   dataclasses.replace(settings, compile="i2vedit_test_broken_backward"))
    assert result.losses == plain.losses


def test_diffusers_lora_branch_runs_in_the_activation_dtype():
    backend = tiny_backend(seed=0)
    backend.attach_lora(LoraSpec(rank=4), torch.Generator().manual_seed(0))
    layer = next(iter(diffusers_lora.lora_layers(backend.unet).values()))
    down, up = layer.lora_A[diffusers_lora.ADAPTER], layer.lora_B[diffusers_lora.ADAPTER]
    with torch.no_grad():
        up.weight.normal_()
    assert down.weight.dtype == up.weight.dtype == torch.float32  # fp32 master weights
    layer.base_layer.to(torch.bfloat16)
    x = torch.randn(3, layer.in_features, dtype=torch.bfloat16)
    with torch.no_grad():
        out = layer(x)
        base = layer.base_layer(x)
        in_bf16 = (x @ down.weight.bfloat16().T) @ up.weight.bfloat16().T
        in_fp32 = ((x.float() @ down.weight.T) @ up.weight.T)
        diffusers_lora.set_full_precision(backend.unet, True)
        out_fp32 = layer(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, base + in_bf16 * layer.scaling[diffusers_lora.ADAPTER], rtol=0, atol=0)
    torch.testing.assert_close(out_fp32, (base.float() + in_fp32 * layer.scaling[diffusers_lora.ADAPTER]).bfloat16(),
                               rtol=0, atol=0)
    assert not torch.equal(out, out_fp32)  # the switch changes where the branch rounds


def test_the_next_edit_in_the_same_process_does_not_compile_again():
    """A long-lived backend's next edit (the Python API): the same backend edits again with a fresh adapter. dynamo
    guards on the identity of each adapted Linear's `forward`; the training forwards made per clip
    (FusedDropoutForward) recompiled the whole UNet (the diffusers second edit on the H200, PERFORMANCE run 7)."""
    from torch._dynamo.utils import counters

    from i2vedit_core.inversion import InversionSettings
    from i2vedit_core.pipeline import edit_video

    settings = PipelineSettings(clip_length=6, working_size=(64, 64), inversion=InversionSettings(steps=2),
                                training=TrainingSettings(steps=2, compile="eager"), skip_interval=False)
    video = synthetic_clip(6, 64, 64)
    backend = tiny_backend(seed=0)
    torch._dynamo.reset()
    counters.clear()
    edit_video(backend, video, video[:1], settings)
    assert counters["stats"]["unique_graphs"] == 1
    edit_video(backend, video, video[:1], settings)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["recompiles"]
