"""Motion LoRA on ComfyBackend: init and output parity with the diffusers backend, training under
ComfyUI's inference mode, and the exported file in core `LoraLoaderModelOnly`."""

import logging

import pytest
import torch

from i2vedit_core.backends.base import Conditioning, LoraBackend
from i2vedit_core.lora import LoraSpec, motion_lora_from_pairs, save_motion_lora
from i2vedit_core.memory import plan_of
from i2vedit_core.tiny import synthetic_clip
from i2vedit_core.training import TrainingSettings, train_motion_lora

FRAMES = 3


def relative(a, b) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def cond():
    gen = torch.Generator().manual_seed(8)
    return Conditioning(torch.randn(1, 1, 64, generator=gen), torch.randn(1, FRAMES, 4, 8, 8, generator=gen),
                        torch.tensor([[6.0, 127.0, 0.02]]))


@pytest.fixture(scope="module")
def x():
    return torch.randn(1, FRAMES, 4, 8, 8, generator=torch.Generator().manual_seed(9)) * 3


@pytest.fixture()
def diffusers_lora(diffusers_backend):
    yield diffusers_backend
    diffusers_backend.detach_lora()  # the diffusers backend is shared by the whole session


def random_lora(backend, spec: LoraSpec, seed: int = 0):
    """A LoRA with non-zero up weights on every target of `backend` (scale visible in the output)."""
    from i2vedit_core.backends.comfy_lora import targets

    gen = torch.Generator().manual_seed(seed)
    pairs = {path: (torch.randn(spec.rank, i, generator=gen) * 0.2, torch.randn(o, spec.rank, generator=gen) * 0.2)
             for path, (o, i) in targets(backend.linears, spec).items()}
    return motion_lora_from_pairs(pairs, spec)


def test_fresh_adapter_is_the_diffusers_one(comfy_backend, diffusers_lora):
    assert isinstance(comfy_backend, LoraBackend)
    spec = LoraSpec(rank=4)
    comfy_backend.attach_lora(spec, torch.Generator().manual_seed(21))
    diffusers_lora.attach_lora(spec, torch.Generator().manual_seed(21))
    ours, theirs = comfy_backend.export_lora(), diffusers_lora.export_lora()
    assert len(ours.module_paths) == 192 and ours.weights.keys() == theirs.weights.keys()
    assert all(torch.equal(ours.weights[k], theirs.weights[k]) for k in theirs.weights)
    assert len(comfy_backend.lora_parameters()) == 384
    assert all(p.dtype == torch.float32 and p.requires_grad for p in comfy_backend.lora_parameters())


@pytest.mark.parametrize("attn1_only", [False, True])
def test_loaded_lora_matches_diffusers_at_every_scale(comfy_backend, diffusers_lora, x, cond, attn1_only):
    lora = random_lora(comfy_backend, LoraSpec(rank=4, attn1_only=attn1_only))
    base = comfy_backend.denoise(x, 2.0, cond)
    comfy_backend.load_lora(lora)
    diffusers_lora.load_lora(lora)
    for scale in (1.0, 0.5):
        expected = diffusers_lora.denoise(x, 2.0, cond, lora_scale=scale)
        got = comfy_backend.denoise(x, 2.0, cond, lora_scale=scale)
        assert relative(got, expected) < 1e-4, scale  # measured ~2e-6
        assert relative(got, base) > 1e-3  # the LoRA acts
    assert torch.equal(comfy_backend.denoise(x, 2.0, cond, lora_scale=0.0), base)  # exact base model
    comfy_backend.detach_lora()
    assert torch.equal(comfy_backend.denoise(x, 2.0, cond), base)


def test_lora_scale_travels_in_the_calls_transformer_options(comfy_backend, x, cond):
    """Each UNet call carries its own (scale, slot) under LORA_KEY, as the attention pass travels under
    CONTROLLER_KEY; the Linears see it only during that call, and no backend attribute holds it."""
    import comfy.patcher_extension as ext

    from i2vedit_core.backends import comfy_lora

    comfy_backend.load_lora(random_lora(comfy_backend, LoraSpec(rank=2)))
    seen = []

    def spy(executor, *args, **kwargs):  # another pack's DIFFUSION_MODEL wrapper, inside ours or outside it
        seen.append((args[5].get(comfy_lora.LORA_KEY), comfy_lora.CALL.get()))
        return executor(*args, **kwargs)
    comfy_backend.patcher.add_wrapper_with_key(ext.WrappersMP.DIFFUSION_MODEL, "spy", spy)
    try:
        half = comfy_backend.denoise(x, 2.0, cond, lora_scale=0.5)
        comfy_backend.denoise(x, 2.0, cond, lora_scale=0.0, lora_slot="clip0")
    finally:
        comfy_backend.patcher.remove_wrappers_with_key(ext.WrappersMP.DIFFUSION_MODEL, "spy")
    assert [carried for carried, _ in seen] == [(0.5, "clip"), (0.0, "clip0")]
    assert comfy_lora.CALL.get() == comfy_lora.OUTSIDE_A_CALL  # nothing outlives a call
    assert not hasattr(comfy_backend.lora, "scale") and not hasattr(comfy_backend.lora, "slot")
    # The same call driven from outside the backend (as a guider's wrapper does), with options of another MODEL:
    flat, inputs = comfy_backend._unet_inputs(x, cond)
    sigmas = torch.full((flat.shape[0],), 2.0)
    options = {"cond_or_uncond": [0], "sigmas": sigmas, "wrappers": {}}
    inputs["transformer_options"] = comfy_lora.with_lora(options, 0.5)
    assert options == {"cond_or_uncond": [0], "sigmas": sigmas, "wrappers": {}}  # the caller's dict is untouched
    with torch.no_grad():
        out = comfy_backend.patcher.model.apply_model(flat, sigmas, **inputs)
    assert relative(out.view_as(x), half) < 1e-6


def test_lora_of_another_shape_is_refused_naming_the_file(comfy_backend):
    lora = random_lora(comfy_backend, LoraSpec(rank=2))
    path = next(iter(lora.weights))
    lora.weights[path.replace("lora_down", "lora_up") if "lora_down" in path else path] = torch.zeros(3, 2)
    lora.source = "wrong.safetensors"
    with pytest.raises(ValueError, match="wrong.safetensors"):
        comfy_backend.load_lora(lora)


@pytest.fixture(scope="module")
def inference_backend(tiny_weights, comfy_parts):
    """A backend on a MODEL built under torch.inference_mode(), as ComfyUI's loader runs: its weights
    are inference tensors (COMFYUI_NOTES 5.3)."""
    from tiny_comfy import comfy_model

    from i2vedit_core.backends.comfy import ComfyBackend

    with torch.inference_mode():
        model = comfy_model(tiny_weights["unet"])
    assert all(p.is_inference() for p in model.model.parameters())
    backend = ComfyBackend(model, comfy_parts["clip_vision"], comfy_parts["vae"])
    yield backend
    backend.release()


def _train(backend, checkpointing: bool):
    clip = synthetic_clip(num_frames=FRAMES, height=64, width=64, seed=2)
    settings = TrainingSettings(steps=3, learning_rate=1e-2, lora=LoraSpec(rank=4), seed=4,
                                gradient_checkpointing=checkpointing)
    with torch.inference_mode():  # as the executor runs every node
        return train_motion_lora(backend, clip, settings)


def test_training_fails_without_replacing_inference_tensors(inference_backend, monkeypatch):
    from i2vedit_core.backends import comfy_training

    monkeypatch.setattr(comfy_training, "replace_inference_tensors", lambda model, swapped, slots=None: 0)
    with pytest.raises(RuntimeError, match="[Ii]nference tensors"):
        _train(inference_backend, False)
    assert inference_backend.lora.spec is None  # train_motion_lora detaches on error


def test_training_runs_under_comfy_inference_mode(inference_backend, monkeypatch):
    from i2vedit_core.backends import comfy_training

    # SGD: AdamW's first updates are about lr x sign(gradient), so the fp32 rounding by which the reentrant
    # checkpoint's gradients differ (it differentiates in another order) moves a weight whose gradient is near zero
    # by 2 lr (losses measured 2e-3 apart by step 3); SGD's updates are the gradients themselves.
    monkeypatch.setattr(torch.optim, "AdamW", lambda params, lr, **_: torch.optim.SGD(params, lr=lr))
    before = {k: v.clone() for k, v in inference_backend.patcher.model.state_dict().items()}
    objects = {name: (p, p.is_inference()) for name, p in inference_backend.patcher.model.named_parameters()}
    plain = _train(inference_backend, False)
    after_one = dict(inference_backend.patcher.model.named_parameters())
    assert all(after_one[n] is p and p.is_inference() == was for n, (p, was) in objects.items())  # put back
    recomputed = []
    original = comfy_training.recompute
    monkeypatch.setattr(comfy_training, "recompute", lambda *a, **k: recomputed.append(1) or original(*a, **k))
    checkpointed = _train(inference_backend, True)
    assert len(recomputed) == 3 * 38  # per step: 22 VideoResBlocks + 16 SpatialVideoTransformers
    losses = plain.losses
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses))) and len(set(losses)) == 3
    # Same seed, same steps: recomputation in backward changes nothing but memory, and fp32 rounding, which three
    # steps at lr 1e-2 on the random tiny UNet grow to 4.0e-4 relative (measured, torch 2.14.1);
    # test_checkpointed_gradients_are_plain_ones compares the gradients themselves.
    assert checkpointed.losses == pytest.approx(losses, rel=1e-3)
    ups = [plain.lora.pair(p)[1] for p in plain.lora.module_paths]
    assert max(float(u.abs().max()) for u in ups) > 0  # up started at zero: training moved it
    after = inference_backend.patcher.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # values kept (tensors were swapped)
    assert inference_backend.lora.dropout_active is False and inference_backend.checkpointing.layers == frozenset()
    assert not inference_backend.checkpointing.swapped


def test_exported_lora_loads_in_core_loader(comfy_backend, comfy_parts, x, cond, tmp_path, caplog):
    import folder_paths
    import nodes

    from i2vedit_core.backends.comfy import ComfyBackend

    lora = random_lora(comfy_backend, LoraSpec(rank=4), seed=3)
    comfy_backend.load_lora(lora)
    ours = comfy_backend.denoise(x, 2.0, cond, lora_scale=1.0)
    save_motion_lora(comfy_backend.export_lora({"note": "host test"}), tmp_path / "motion.safetensors")
    folder_paths.add_model_folder_path("loras", str(tmp_path))
    with caplog.at_level(logging.WARNING):
        (patched,) = nodes.LoraLoaderModelOnly().load_lora_model_only(comfy_parts["model"], "motion.safetensors", 1.0)
    assert "lora key not loaded" not in caplog.text
    assert len(patched.patches) == 192  # every adapted Linear got its patch
    core = ComfyBackend(patched, comfy_parts["clip_vision"], comfy_parts["vae"])
    try:
        merged = core.denoise(x, 2.0, cond)
    finally:
        core.release()
    assert relative(merged, ours) < 1e-5  # weight-merged vs activation-space: fp32 round-off only
    assert relative(merged, comfy_backend.denoise(x, 2.0, cond, lora_scale=0.0)) > 1e-3


def test_checkpointed_gradients_are_plain_ones(comfy_backend, monkeypatch):
    """One SGD step of lr 1 moves each LoRA weight by its gradient: recomputing the 3 finest levels, the 24gb tier's
    (level, kind) set or every level in backward (the reentrant checkpoint with its anchor, recompute.py) gives
    plain autograd's gradients, every adapted Linear's included, up to fp32 rounding."""
    monkeypatch.setattr(torch.optim, "AdamW", lambda params, lr, **_: torch.optim.SGD(params, lr=1.0))
    clip = synthetic_clip(num_frames=FRAMES, height=64, width=64, seed=2)
    runs = {}
    settings_24gb = plan_of("24gb").checkpointing
    for levels in (False, 3, settings_24gb, True):
        settings = TrainingSettings(steps=1, lora=LoraSpec(rank=4), seed=4, gradient_checkpointing=levels)
        runs[levels] = train_motion_lora(comfy_backend, clip, settings)
    plain = runs[False].lora
    ups = {path: plain.pair(path)[1] for path in plain.module_paths}
    largest = max(float(u.abs().max()) for u in ups.values())
    assert largest > 0
    for levels in (3, settings_24gb, True):
        assert runs[levels].losses == pytest.approx(runs[False].losses, rel=1e-6)
        for path, up in ups.items():
            torch.testing.assert_close(runs[levels].lora.pair(path)[1], up, rtol=0, atol=1e-5 * largest)


def test_only_the_transformers_hold_the_lora(comfy_backend):
    """Checkpointed layers that hold no adaptable Linear run plainly when their inputs need no gradient
    (recompute's holds_trainable): that must be exactly the ResBlocks."""
    from collections import Counter

    from i2vedit_core.backends import comfy_training

    layers = [f for f in comfy_backend.patcher.object_patches.values()
              if isinstance(f, comfy_training.CheckpointedForward)]
    assert Counter((type(f.module).__name__, f.holds_lora) for f in layers) == {
        ("VideoResBlock", False): 22, ("SpatialVideoTransformer", True): 16}
