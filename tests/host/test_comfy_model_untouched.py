"""The incoming MODEL is never mutated: its weights, patches and model_options are as before use."""

import copy

import torch

from i2vedit_core.backends.base import Conditioning

PATCHED_KEY = "diffusion_model.input_blocks.1.1.time_stack.0.attn1.to_q.weight"


def _snapshot(patcher) -> dict:
    return dict(weights={k: v.clone() for k, v in patcher.model.state_dict().items()},
                patches={k: list(v) for k, v in patcher.patches.items()},
                object_patches=dict(patcher.object_patches),
                model_options=copy.deepcopy(patcher.model_options))


def _incoming_model(base):
    """A MODEL as a LoRA loader and a patching node would hand it over: a weight patch and options."""
    model = base.clone()
    weight = model.model.state_dict()[PATCHED_KEY]
    delta = torch.full_like(weight, 0.05)
    assert model.add_patches({PATCHED_KEY: ("diff", (delta,))}) == [PATCHED_KEY]
    model.model_options.setdefault("transformer_options", {})["from_upstream"] = 1
    return model


def test_incoming_model_unchanged(comfy_parts):
    from i2vedit_core.backends.comfy import ComfyBackend

    incoming = _incoming_model(comfy_parts["model"])
    before = _snapshot(incoming)
    cond = Conditioning(torch.ones(1, 1, 64), torch.zeros(1, 3, 4, 8, 8), torch.tensor([[6.0, 127.0, 0.02]]))
    x = torch.randn(1, 3, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    backend = ComfyBackend(incoming, comfy_parts["clip_vision"], comfy_parts["vae"])
    patched = backend.denoise(x, 2.0, cond)
    # While loaded the upstream weight patch is merged into the shared module, as in any sampler.
    assert not torch.equal(incoming.model.state_dict()[PATCHED_KEY], before["weights"][PATCHED_KEY])
    backend.release()
    plain = ComfyBackend(comfy_parts["model"], comfy_parts["clip_vision"], comfy_parts["vae"])
    base_out = plain.denoise(x, 2.0, cond)
    plain.release()
    # The upstream patch reached the UNet (so the checks below could have failed) ...
    assert float((patched - base_out).abs().max()) > 1e-4
    # ... and after use every weight, patch and option of the incoming MODEL is as it was.
    after = _snapshot(incoming)
    assert after["weights"].keys() == before["weights"].keys()
    changed = [k for k in before["weights"] if not torch.equal(after["weights"][k], before["weights"][k])]
    assert changed == []
    assert after["patches"].keys() == before["patches"].keys() == {PATCHED_KEY}
    assert after["object_patches"] == before["object_patches"] == {}
    assert after["model_options"] == before["model_options"]
    assert backend.patcher is not incoming and backend.patcher.model is incoming.model
