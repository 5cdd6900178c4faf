"""Attention control on ComfyUI's SVD: the 32 object-patched attn1 forwards, by site, never by count.

Measured (CPU, fp32, tiny model): a controlled D with a plain-SDPA pass differs from the
uncontrolled D by exactly 0; after a source pass, the edit pass's D agrees with the diffusers
backend to 5.8e-6 relative and its difference maps to 3.3e-5 absolute (edit_clip: test_comfy_editing.py).
"""

from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from i2vedit_core.attention import AttentionController
from i2vedit_core.backends.base import Conditioning
from i2vedit_core.backends.comfy_attention import ControlledAttn1
from i2vedit_core.backends.diffusers_attention import attn1_sites

FRAMES = 3


class Recorder:
    """An AttentionPass stand-in: plain SDPA, records every site it is called at."""

    def __init__(self, rows, fail_at=None):
        self.rows, self.sites, self.fail_at = tuple(rows), [], fail_at

    def __call__(self, q, k, v, site):
        self.sites.append(site)
        if self.fail_at is not None and len(self.sites) == self.fail_at:
            raise RuntimeError("controller failed mid-forward")
        return F.scaled_dot_product_attention(q, k, v)


@pytest.fixture(scope="module")
def cond():
    gen = torch.Generator().manual_seed(4)
    one = Conditioning(torch.randn(1, 1, 64, generator=gen), torch.randn(1, FRAMES, 4, 8, 8, generator=gen),
                       torch.tensor([[6.0, 127.0, 0.02]]))
    return Conditioning.cat(one.zeros_like(), one)


@pytest.fixture(scope="module")
def x():
    return torch.randn(2, FRAMES, 4, 8, 8, generator=torch.Generator().manual_seed(5)) * 2


def test_sites_are_the_diffusers_sites(comfy_backend, tiny_weights):
    ours = {(s.kind, s.path, s.downscale) for _, s in comfy_backend.attn1.values()}
    theirs = {(s.kind, s.path, s.downscale) for s in attn1_sites(tiny_weights["unet"])}
    assert len(ours) == 32 and ours == theirs
    assert Counter(kind for kind, _, _ in ours) == {"spatial": 16, "temporal": 16}
    assert sorted(Counter(d for _, _, d in ours).items()) == [(1, 10), (2, 10), (4, 10), (8, 2)]


def test_every_attn1_call_reaches_the_controller_once_per_site(comfy_backend, diffusers_backend, x, cond):
    ours, theirs = Recorder(("uncond", "cond")), Recorder(("uncond", "cond"))
    comfy_backend.denoise(x, 1.0, cond, attention=ours)
    diffusers_backend.denoise(x, 1.0, cond, attention=theirs)
    assert len(ours.sites) == 32
    assert Counter(s.kind for s in ours.sites) == {"spatial": 16, "temporal": 16}
    assert len({s.path for s in ours.sites}) == 32
    # Same sites with the same layouts (rows, frames, tokens, grid) as the diffusers backend sees.
    assert sorted(ours.sites, key=lambda s: s.path) == sorted(theirs.sites, key=lambda s: s.path)
    top = next(s for s in ours.sites if s.path == "down_blocks.0.attentions.0.transformer_blocks.0.attn1")
    assert top.layout.rows == ("uncond", "cond") and top.layout.frames == FRAMES and top.layout.grid == (8, 8)
    mid = next(s for s in ours.sites if s.path.startswith("mid_block") and s.kind == "temporal")
    assert mid.downscale == 8 and mid.layout.grid == (1, 1) and mid.layout.tokens == 1


def test_controller_off_is_bit_identical_to_the_unpatched_model(comfy_parts, comfy_backend, x, cond):
    from i2vedit_core.backends.comfy import ComfyBackend

    patched = comfy_backend.denoise(x, 2.0, cond)
    plain = ComfyBackend(comfy_parts["model"], comfy_parts["clip_vision"], comfy_parts["vae"])
    plain.patcher.object_patches.clear()  # before its first load: a clone with no patches at all
    try:
        reference = plain.denoise(x, 2.0, cond)
    finally:
        plain.release()
    assert torch.equal(patched, reference)
    # A plain-SDPA pass computes the same attention through the controller path: same numbers here.
    controlled = comfy_backend.denoise(x, 2.0, cond, attention=Recorder(("uncond", "cond")))
    assert float((controlled - reference).abs().max()) < 1e-5


def test_cond_or_uncond_follows_the_rows(comfy_parts, x, cond):
    from i2vedit_core.backends.comfy import ComfyBackend

    seen = []
    model = comfy_parts["model"].clone()
    model.set_model_attn1_output_patch(lambda n, extra: seen.append(list(extra["cond_or_uncond"])) or n)
    backend = ComfyBackend(model, comfy_parts["clip_vision"], comfy_parts["vae"])
    try:
        backend.denoise(x, 1.0, cond, attention=Recorder(("uncond", "cond")))
        backend.denoise(x[:1], 1.0, _first(cond), attention=Recorder(("source",)))
    finally:
        backend.release()
    assert seen[:32] == [[1, 0]] * 32 and seen[32:] == [[0]] * 32


def _first(cond: Conditioning) -> Conditioning:
    return Conditioning(cond.image_embeds[1:], cond.image_latents[1:], cond.time_ids[1:])


def test_real_controller_passes_match_diffusers(comfy_backend, diffusers_backend, x, cond):
    """A source pass (capture) then an edit pass (match) on both backends: same D, same masks."""
    results = []
    for backend in (diffusers_backend, comfy_backend):
        controller = AttentionController(steps=4)
        controller.begin_step(0)
        backend.denoise(x[1:], 3.0, _first(cond), attention=controller.source_pass(), lora_scale=0.0)
        edited = backend.denoise(x + 0.3, 3.0, cond, attention=controller.edit_pass())
        results.append((edited, dict(controller.buffer.masks), set(controller.buffer.temporal_source)))
    (expected, masks_d, temporal_d), (got, masks_c, temporal_c) = results
    assert float((got - expected).norm() / expected.norm()) < 1e-4  # measured 5.8e-6
    unmatched = diffusers_backend.denoise(x + 0.3, 3.0, cond)
    assert float((expected - unmatched).norm() / unmatched.norm()) > 1e-3  # matching changed D (4.5e-3)
    assert masks_c.keys() == masks_d.keys() and len(masks_c) == 16
    assert temporal_c == temporal_d and len(temporal_c) == 16  # step 0 < beta1: all temporal layers
    for path in masks_d:
        assert masks_c[path].shape == masks_d[path].shape
        assert float((masks_c[path].float() - masks_d[path].float()).abs().max()) < 1e-3, path  # 3.3e-5


def test_bad_layouts_name_the_problem(comfy_backend, x, cond):
    with pytest.raises(ValueError, match="attention pass describes 1 videos"):
        comfy_backend.denoise(x, 1.0, cond, attention=Recorder(("cond",)))


def test_exception_mid_forward_leaves_model_and_backend_clean(comfy_parts, x, cond):
    from i2vedit_core.backends.comfy import ComfyBackend

    incoming = comfy_parts["model"].clone()
    incoming.model_options.setdefault("transformer_options", {})["from_upstream"] = 1
    options_before = repr(incoming.model_options)
    weights_before = {k: v.clone() for k, v in incoming.model.state_dict().items()}
    backend = ComfyBackend(incoming, comfy_parts["clip_vision"], comfy_parts["vae"])
    try:
        with pytest.raises(RuntimeError, match="mid-forward"):
            backend.denoise(x, 1.0, cond, attention=Recorder(("uncond", "cond"), fail_at=7), lora_scale=0.3)
        from i2vedit_core.backends import comfy_lora

        assert comfy_lora.CALL.get() == comfy_lora.OUTSIDE_A_CALL  # the failed call's scale 0.3 did not stay
        again = backend.denoise(x, 1.0, cond)  # still usable, and plain again
        assert torch.isfinite(again).all()
    finally:
        backend.release()
    assert repr(incoming.model_options) == options_before
    assert incoming.object_patches == {} and backend.patcher.object_patches_backup == {}
    after = incoming.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in weights_before.items())
    _assert_no_patch_installed(backend)


def test_release_removes_every_patch(comfy_backend, x, cond):
    comfy_backend.denoise(x, 1.0, cond, attention=Recorder(("uncond", "cond")))
    unet = comfy_backend.patcher.model.diffusion_model
    installed = [p for p in comfy_backend.attn1 if isinstance(unet.get_submodule(p).forward, ControlledAttn1)]
    assert len(installed) == 32  # while loaded
    comfy_backend.release()
    _assert_no_patch_installed(comfy_backend)


def _assert_no_patch_installed(backend):
    unet = backend.patcher.model.diffusion_model
    ours = [name for name, m in unet.named_modules() if not hasattr(m.forward, "__func__")]
    assert ours == []  # every forward is a bound method of its own class again
    for name, m in unet.named_modules():
        assert m.forward.__func__ is type(m).forward, name
