"""The next prompt of a ComfyUI server and torch.compile: each node execution builds its own ComfyBackend on a clone
of the MODEL (nodes/host.py), with its own object-patched forwards (the LoRA Linears, attn1, the checkpointed
layers). dynamo guards on the identity of a module's `forward`, so the second backend's compiled training traces
and compiles the UNet again. This is why the nodes offer no compile switch yet (docs/PERFORMANCE.md, run 8): the
measured second-edit speed-up holds for one long-lived backend (`bench/e2e.py --again`), not per prompt."""

import pytest
import torch

from i2vedit_core.tiny import synthetic_clip
from i2vedit_core.training import TrainingSettings, train_motion_lora


def test_one_backend_compiles_once_and_the_next_prompts_backend_again(comfy_parts):
    from i2vedit_core.backends.comfy import ComfyBackend
    from torch._dynamo.utils import counters

    frames = synthetic_clip(num_frames=3, height=64, width=64, seed=4)
    settings = TrainingSettings(steps=2, learning_rate=1e-2, seed=3, compile="eager")
    torch._dynamo.reset()
    counters.clear()
    graphs = []
    for _prompt in range(2):
        backend = ComfyBackend(comfy_parts["model"], comfy_parts["clip_vision"], comfy_parts["vae"])
        try:
            train_motion_lora(backend, frames, settings)
            train_motion_lora(backend, frames, settings)  # the same backend again, a fresh adapter: no new graph
        finally:
            backend.release()
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] == 1
    if graphs[1] != 1:
        pytest.xfail(f"known: the second backend compiled again ({graphs[1] - graphs[0]} new graphs); the fix is "
                     f"forwards shared per diffusion model")
