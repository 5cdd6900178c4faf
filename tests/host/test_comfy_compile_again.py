"""The next prompt of a ComfyUI server and torch.compile: each node execution builds its own ComfyBackend on a clone
of the MODEL (nodes/host.py). dynamo guards on the identity of a module's `forward`, so the backends object-patch
the same forwards, made once per diffusion model (comfy_forwards), and the next prompt's compiled training reuses
the graph. With forwards made per backend (run 8) the second backend compiled again: 2 graphs, not 1."""

import torch

from i2vedit_core.tiny import synthetic_clip
from i2vedit_core.training import TrainingSettings, train_motion_lora


def test_the_next_prompts_backend_does_not_compile_again(tiny_weights, comfy_parts):
    from i2vedit_core.backends.comfy import ComfyBackend
    from tiny_comfy import comfy_model
    from torch._dynamo.utils import counters

    with torch.inference_mode():  # as ComfyUI's loader: inference-tensor weights, swapped for each training
        model = comfy_model(tiny_weights["unet"])

    frames = synthetic_clip(num_frames=3, height=64, width=64, seed=4)
    settings = TrainingSettings(steps=2, learning_rate=1e-2, seed=3, compile="eager")
    torch._dynamo.reset()
    counters.clear()
    graphs, loras = [], []
    for _prompt in range(2):
        with torch.inference_mode():  # as ComfyUI's executor runs a node
            backend = ComfyBackend(model, comfy_parts["clip_vision"], comfy_parts["vae"])
            try:
                train_motion_lora(backend, frames, settings)
                train_motion_lora(backend, frames, settings)  # the same backend again, a fresh adapter: no new graph
                loras.append(backend.export_lora().weights)
            finally:
                backend.release()
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs == [1, 1]
    # Each prompt trained its own adapter through the reused graph (the shared forwards read the running backend's).
    assert loras[0].keys() == loras[1].keys()
    assert all(torch.equal(loras[0][key], loras[1][key]) for key in loras[0])
    assert any(key.endswith("lora_up.weight") and loras[1][key].abs().max() > 0 for key in loras[1])
