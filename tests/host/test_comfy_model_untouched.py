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


# --- after every node that runs the UNet ---------------------------------------------------------------
# ComfyUI's loader builds the model under torch.inference_mode(), so its parameters are inference tensors: the
# Train node has to swap them for training (comfy_training.replace_inference_tensors) and must put the same
# objects back. The loaded-model list belongs to ComfyUI: an entry for another model must survive every node
# (ComfyUI itself drops entries of other clones of the same model when it loads ours; that is its own logic).

import pytest  # noqa: E402

NODE_RUNS = ("I2VEditInvert", "I2VEditTrainMotionLora", "I2VEditPropagate", "I2VEditEditVideo",
             "I2VEditMatchedSampler")


@pytest.fixture(scope="module")
def shared(tiny_weights, comfy_parts):
    """MODEL built under inference mode (as ComfyUI's loader runs), another loaded model, clips and an inversion."""
    import comfy.model_management as mm
    from test_nodes import CLIP_WIDGETS, INVERT_WIDGETS, edited, run, video
    from tiny_comfy import comfy_model

    from pack import node_classes

    with torch.inference_mode():
        model, other = comfy_model(tiny_weights["unet"]), comfy_model(tiny_weights["unet"])
    assert all(p.is_inference() for p in model.model.parameters())
    nodes = {cls.define_schema().node_id: cls for cls in node_classes()}
    parts = dict(model=model, clip_vision=comfy_parts["clip_vision"], vae=comfy_parts["vae"])
    source = video()
    clips = run(nodes["I2VEditSourceClips"], frames=source, **CLIP_WIDGETS)[0]
    inversion = run(nodes["I2VEditInvert"], clips=clips, **parts, **INVERT_WIDGETS)[0]
    mm.load_models_gpu([other])
    return dict(nodes=nodes, parts=parts, source=source, edited=edited(source), clips=clips, inversion=inversion,
                other=other)


def run_node(name, shared):
    from test_matched_sampler import sample
    from test_nodes import CLIP_WIDGETS, INVERT_WIDGETS, MATCH_WIDGETS, TRAIN_WIDGETS, run

    nodes, parts = shared["nodes"], shared["parts"]
    if name == "I2VEditInvert":
        return run(nodes[name], clips=shared["clips"], **parts, **INVERT_WIDGETS)
    if name == "I2VEditTrainMotionLora":
        return run(nodes[name], clips=shared["clips"], inversion=shared["inversion"], **parts, **TRAIN_WIDGETS)
    if name == "I2VEditPropagate":
        return run(nodes[name], inversion=shared["inversion"], edited_first_frames=shared["edited"], **parts,
                   **MATCH_WIDGETS)
    if name == "I2VEditEditVideo":
        widgets = {**CLIP_WIDGETS, **INVERT_WIDGETS, **TRAIN_WIDGETS, **MATCH_WIDGETS, "train_motion_lora": True}
        return run(nodes[name], frames=shared["source"], edited_first_frame=shared["edited"], **parts, **widgets)
    setup = dict(parts=parts, inverted=shared["inversion"], edited=shared["edited"], lora_model=parts["model"])
    return sample(setup, nodes, None)  # in SamplerCustomAdvanced, with a CFGGuider on the same MODEL


@pytest.mark.parametrize("name", NODE_RUNS)
def test_shared_model_and_loaded_list_after_node(shared, name):
    import comfy.model_management as mm

    model = shared["parts"]["model"]
    params = {n: (p, p.is_inference(), p.detach().clone()) for n, p in model.model.named_parameters()}
    buffers = {n: b for n, b in model.model.named_buffers()}
    entries = list(mm.current_loaded_models)
    other = [e for e in entries if e.model is shared["other"]]
    assert len(other) == 1 and len({id(e.model.model) for e in entries}) >= 3  # the other UNet, the VAE, CLIP vision

    run_node(name, shared)

    after = dict(model.model.named_parameters())
    assert after.keys() == params.keys()
    for n, (p, inference, value) in params.items():
        assert after[n] is p, f"{name}: parameter {n} is a new object"
        assert p.is_inference() == inference and torch.equal(p, value), n
    assert all(b is buffers[n] for n, b in model.model.named_buffers())
    # Entries of other models are the same LoadedModel objects; only clones of this MODEL may have come or gone.
    kept = [e for e in entries if e.model is not None and not e.model.is_clone(model)]
    assert all(any(e is now for now in mm.current_loaded_models) for e in kept), name
    # No patch of ours is left on the shared modules: every forward is its class's own again (ComfyUI's unpatch
    # sets the bound method it backed up).
    assert [n for n, m in model.model.named_modules() if getattr(m.forward, "__func__", None) is not type(m).forward] == []


def test_the_pack_never_edits_comfyuis_loaded_model_list():
    from pack import REPO

    sources = [*REPO.glob("i2vedit_core/backends/comfy*.py"), *REPO.glob("nodes/*.py")]
    assert len(sources) > 10
    assert [p.name for p in sources if "current_loaded_models" in p.read_text()] == []
