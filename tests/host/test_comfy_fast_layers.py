"""The ComfyUI backend's faster layers: SVD's one-key cross-attention (attn2) without an attention kernel (ComfyUI's
output and gradients, exactly), the split-statistics GroupNorm, and the training step's LayerNorm and GEGLU
(ComfyUI's own forward where it casts weights; an edit's forward is ComfyUI's bit for bit)."""

import pytest
import torch

from i2vedit_core.backends import comfy_cross_attention as cross
from i2vedit_core.backends import comfy_group_norm, comfy_training_layers
from i2vedit_core.geglu import GegluForward


def attn2_modules(comfy_parts):
    return {p: m for p, m in comfy_parts["model"].model.diffusion_model.named_modules() if p.endswith(".attn2")}


def one_of(comfy_parts, kind):
    return next(m for p, m in attn2_modules(comfy_parts).items() if f".{kind}.0.attn2" in p)


def inputs(module, keys=1, batch=6, queries=10, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, queries, module.to_q.in_features, generator=gen).requires_grad_()
    context = torch.randn(batch, keys, module.to_k.in_features, generator=gen).requires_grad_()
    return x, context


def test_every_attn2_of_svd_gets_the_forward(comfy_parts):
    modules = attn2_modules(comfy_parts)
    patches = cross.forwards(comfy_parts["model"].model.diffusion_model)
    assert set(patches) == {f"diffusion_model.{p}.forward" for p in modules}
    spatial = [p for p in modules if ".transformer_blocks.0." in p]
    assert len(spatial) > 0 and len(modules) == 2 * len(spatial)  # a spatial and a temporal one per transformer


@pytest.mark.parametrize("kind", ["transformer_blocks", "time_stack"])
def test_one_key_gives_comfyuis_output_and_gradients_without_a_kernel(comfy_parts, kind, monkeypatch):
    import comfy.ldm.modules.attention as attention

    module = one_of(comfy_parts, kind)
    x, context = inputs(module)
    expected = type(module).forward(module, x, context=context)
    expected_x, expected_context = torch.autograd.grad(expected.square().sum(), (x, context))

    def no_kernel(*args, **kwargs):
        raise AssertionError("the one-key forward called an attention kernel")

    monkeypatch.setattr(attention, "optimized_attention", no_kernel)
    out = cross.OneKeyCrossAttention(module)(x, context=context)
    assert torch.equal(out, expected)  # any kernel returns v itself over one key
    grad_x, grad_context = torch.autograd.grad(out.square().sum(), (x, context), allow_unused=True)
    assert grad_x is None and float(expected_x.abs().max()) < 1e-6  # x reaches the output only through q
    torch.testing.assert_close(grad_context, expected_context, rtol=1e-5, atol=1e-7)


def test_more_keys_or_a_mask_run_comfyuis_forward(comfy_parts):
    module = one_of(comfy_parts, "transformer_blocks")
    forward = cross.OneKeyCrossAttention(module)
    x, context = inputs(module, keys=3)
    torch.testing.assert_close(forward(x, context=context), type(module).forward(module, x, context=context),
                               rtol=0, atol=0)
    x, context = inputs(module, keys=1)
    assert not cross.one_key(x, context, context, torch.zeros(x.shape[1], 1))
    assert not cross.one_key(x, None, None, None)
    assert not cross.one_key(x, context[:2], context[:2], None)  # batches differ: ComfyUI's kernels refuse it too
    assert cross.one_key(x, context, context, None)
    calls = []

    def override(func, *args, **kwargs):  # another pack's attention function (ComfyUI's optimized_attention_override)
        calls.append(args[0].shape)
        return func(*args, **kwargs)

    out = forward(x, context=context, transformer_options={"optimized_attention_override": override})
    assert len(calls) == 1
    torch.testing.assert_close(out, type(module).forward(module, x, context=context), rtol=0, atol=0)


def test_another_packs_object_patch_on_an_attn2_or_a_group_norm_is_kept(comfy_parts):
    from i2vedit_core.backends.comfy_forwards import shared_forwards

    theirs = comfy_parts["model"].clone()
    base = theirs.model.diffusion_model
    names = [next(n for n in shared_forwards(base).optional if ".attn2." in n),
             next(n for n in shared_forwards(base).optional if ".attn2." not in n)]
    for name in names:
        theirs.add_object_patch(name, lambda *args, **kwargs: None)
    ours = theirs.clone()
    shared_forwards(base).install(ours)
    for name, forward in shared_forwards(base).optional.items():
        assert (ours.object_patches[name] is forward) == (name not in names)


def test_the_backends_unet_equals_the_plain_model(comfy_parts, comfy_backend):
    """The whole UNet with every attn2 patched (no LoRA, no control): ComfyUI's plain forward, bit for bit."""
    import comfy.model_management as mm

    gen = torch.Generator().manual_seed(3)
    model = comfy_parts["model"]
    base = model.model
    frames, shape = 3, (3, 4, 8, 8)
    x, sigma = torch.randn(shape, generator=gen), torch.full((frames,), 1.0)
    c = dict(c_concat=torch.randn(shape, generator=gen), c_crossattn=torch.randn(frames, 1, 64, generator=gen),
             y=base.encode_adm(fps=6.0, motion_bucket_id=127.0, augmentation_level=0.02).repeat(frames, 1),
             num_video_frames=frames)
    fresh = model.clone()
    mm.load_models_gpu([fresh])
    with torch.no_grad():
        plain = fresh.model.apply_model(x, sigma, **c)
    mm.load_models_gpu([comfy_backend.patcher])
    assert all(isinstance(m.forward, cross.OneKeyCrossAttention) for m in attn2_modules(comfy_parts).values())
    norms = [m for m in base.diffusion_model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(norms) > 0 and all(isinstance(m.forward, comfy_group_norm.SplitStatisticsGroupNorm) for m in norms)
    layer_norms = [m for m in base.diffusion_model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(layer_norms) > 0 and all(isinstance(m.forward, comfy_training_layers.ComfyLayerNorm)
                                        for m in layer_norms)
    geglus = [m for m in base.diffusion_model.modules() if type(m).__name__ == "GEGLU"]
    assert len(geglus) > 0 and all(isinstance(m.forward, GegluForward) for m in geglus)
    with torch.no_grad():
        ours = comfy_backend.patcher.model.apply_model(x, sigma, **c)
    assert torch.equal(ours, plain)


@pytest.mark.parametrize("kind", ["group", "layer"])
def test_a_norm_runs_comfyuis_forward_where_comfyui_casts_the_weights(comfy_parts, monkeypatch, kind):
    from i2vedit_core import group_norm, layer_norm

    norm_class, forward_class, module_of, name, shape_of = {
        "group": (torch.nn.GroupNorm, comfy_group_norm.SplitStatisticsGroupNorm, group_norm, "group_norm",
                  lambda m: (2, m.num_channels, 4, 4)),
        "layer": (torch.nn.LayerNorm, comfy_training_layers.ComfyLayerNorm, layer_norm, "layer_norm",
                  lambda m: (2, 5, m.normalized_shape[0]))}[kind]
    module = next(m for m in comfy_parts["model"].model.diffusion_model.modules()
                  if isinstance(m, norm_class) and hasattr(m, "comfy_cast_weights"))
    forward = forward_class(module)
    calls = []
    real = getattr(module_of, name)
    monkeypatch.setattr(module_of, name, lambda *a: calls.append(a) or real(*a))
    x = torch.randn(shape_of(module))
    torch.testing.assert_close(forward(x), type(module).forward(module, x), rtol=0, atol=0)
    size = module.num_groups if kind == "group" else module.normalized_shape
    assert len(calls) == 1 and calls[0][1:] == (size, module.weight, module.bias, module.eps)
    monkeypatch.setattr(module, "comfy_cast_weights", True)  # partly offloaded: ComfyUI casts at each call
    torch.testing.assert_close(forward(x), type(module).forward(module, x), rtol=0, atol=0)
    assert len(calls) == 1


def test_a_training_call_reaches_the_fast_norms_and_geglus_with_frozen_weights(comfy_backend, monkeypatch):
    """The training step's LayerNorm and GEGLU forwards run, and every LayerNorm and GroupNorm they see has no weight
    that trains (norm_precision: otherwise autocast's float32 path would quietly run)."""
    from i2vedit_core import group_norm, layer_norm
    from i2vedit_core.backends.base import Conditioning
    from i2vedit_core.lora import LoraSpec

    seen = {"layer": [], "group": [], "geglu": []}
    for name, module, function in (("layer", layer_norm, "layer_norm"), ("group", group_norm, "group_norm")):
        real = getattr(module, function)
        monkeypatch.setattr(module, function, lambda x, shape, w=None, b=None, eps=1e-5, _real=real, _seen=seen[name]:
                            _seen.append(any(p is not None and p.requires_grad for p in (w, b))) or
                            _real(x, shape, w, b, eps))
    real_geglu = GegluForward.__call__
    monkeypatch.setattr(GegluForward, "__call__", lambda self, *a, **k: seen["geglu"].append(True) or
                        real_geglu(self, *a, **k))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 4, 8, 8, generator=gen)
    cond = Conditioning(torch.randn(1, 1, 64, generator=gen), torch.randn(1, 3, 4, 8, 8, generator=gen),
                        torch.tensor([[6.0, 127.0, 0.02]]))
    comfy_backend.attach_lora(LoraSpec(rank=2), torch.Generator().manual_seed(0))
    try:
        with comfy_backend.lora_training(False):
            comfy_backend.denoise(x, 1.0, cond).square().mean().backward()
    finally:
        comfy_backend.detach_lora()
    assert len(seen["layer"]) > 0 and len(seen["group"]) > 0 and len(seen["geglu"]) > 0
    assert not any(seen["layer"]) and not any(seen["group"])
