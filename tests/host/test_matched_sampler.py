"""I2VEdit Matched Sampler inside core SamplerCustomAdvanced vs the core's `editing.edit_clip` on ComfyBackend.

The guider is core CFGGuider (constant cfg) on conditioning built from the same core `Conditioning` that
edit_clip gets (no conditioning-latent noise, min = max guidance, 1 or 2), so both denoise the same thing: the
sampler's output must match edit_clip's latent and difference maps, the attention controller must see
32 source calls and 32 edit calls per step with matching on the conditional rows, and MODEL must be
unchanged afterwards.
"""

import copy
import types

import pytest
import torch

from i2vedit_core.attention import AttentionController, MatchSettings
from i2vedit_core.conditioning import MicroConditioning, frame_conditioning
from i2vedit_core.editing import EditSettings, edit_clip
from i2vedit_core.inversion import InversionSettings, invert_clip
from i2vedit_core.tiny import synthetic_clip

from pack import node_module

MICRO = MicroConditioning(fps_id=6, noise_aug_strength=0.0)
WIDGETS = dict(preset="local", beta1=0.5, beta2=0.8, threshold_first=0.35, threshold_last=0.35)


def relative(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def guider_conds(cond):
    """Core SVD_img2vid_Conditioning-style positive/negative from a core Conditioning (batch 1)."""
    fps_id, motion, aug = cond.time_ids[0].tolist()
    extra = dict(fps=fps_id + 1, motion_bucket_id=motion, augmentation_level=aug)
    positive = [[cond.image_embeds.cpu(), dict(extra, concat_latent_image=cond.image_latents[0].cpu())]]
    negative = [[torch.zeros_like(cond.image_embeds).cpu(),
                 dict(extra, concat_latent_image=torch.zeros_like(cond.image_latents[0]).cpu())]]
    return positive, negative


def snapshot(model) -> dict:
    forwards = [n for n, m in model.model.diffusion_model.named_modules() if "forward" in m.__dict__]
    return dict(patches=dict(model.patches), object_patches=dict(model.object_patches),
                options=copy.deepcopy(model.model_options), forwards=forwards)


@pytest.fixture(scope="module", params=[1.0, 2.0], ids=["cfg1", "cfg2"])
def case(comfy_parts, request):
    from i2vedit_core.backends.comfy import ComfyBackend

    backend = ComfyBackend(comfy_parts["model"], comfy_parts["clip_vision"], comfy_parts["vae"])
    try:
        clip = synthetic_clip(num_frames=3, height=64, width=64, seed=11)
        inversion = invert_clip(backend, clip, InversionSettings(steps=2, micro=MICRO, seed=5))
        edited = clip[0].clone()
        edited[:, 16:40, 16:40] = torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1)
        edit_cond = frame_conditioning(backend, edited, clip.shape[0], MICRO, torch.Generator().manual_seed(0))
        settings = EditSettings(min_guidance=request.param, max_guidance=request.param, cond_latent_noise=0.0)
        expected = edit_clip(backend, inversion, edit_cond, settings, lora_scale=0.0)
        identity = backend.identity()
    finally:
        backend.release()
    inverted = types.SimpleNamespace(inversions=(inversion,), model_identity=identity)
    return dict(guidance=request.param, inversion=inversion, edit_cond=edit_cond, expected=expected, inverted=inverted,
                latent_scale=backend.latent_scale)


def run_sampler(comfy_parts, case, monkeypatch):
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import SamplerCustomAdvanced

    samplers = node_module("matched_sampler")
    model = comfy_parts["model"]
    sampler = samplers.MatchedSamplerNode.execute(model, comfy_parts["clip_vision"], comfy_parts["vae"],
                                                  case["inverted"], **WIDGETS).result[0]
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(*guider_conds(case["edit_cond"]))
    guider.set_cfg(case["guidance"])
    noise = types.SimpleNamespace(seed=0, generate_noise=lambda latent: torch.zeros_like(latent["samples"]))
    frames, shape = case["inversion"].latents.shape[2], case["inversion"].latents.shape[3:]
    latent = {"samples": torch.zeros(frames, *shape)}
    calls = []
    attend = AttentionController.attend

    def counting(self, q, k, v, site, p):
        calls.append((self.step, "source" if p.capture_source else "edit" if p.match else "other",
                      site.kind, site.layout.rows))
        return attend(self, q, k, v, site, p)
    monkeypatch.setattr(AttentionController, "attend", counting)
    sigmas = case["expected"].sigmas.float()
    out = SamplerCustomAdvanced().sample(noise, guider, sampler, sigmas, latent)
    return out[0]["samples"], sampler.extra_options["job"], calls


def test_matched_sampler_in_sampler_custom_advanced_matches_edit_clip(comfy_parts, case, monkeypatch):
    model = comfy_parts["model"]
    before = snapshot(model)
    samples, job, calls = run_sampler(comfy_parts, case, monkeypatch)
    expected = case["expected"]
    got = samples.float().unsqueeze(0) * case["latent_scale"]  # process_latent_out undone, (1, F, 4, h, w)
    assert relative(got, expected.latent) < 1e-3, relative(got, expected.latent)
    assert relative(expected.latent, case["inversion"].latents[0]) > 0.05  # the edit moved away from the source
    # Per step: 32 source calls, then 32 edit calls of one UNet call: [cond, uncond] batched, or cond alone at
    # cfg 1 (ComfyUI skips the negative there).
    roles = ["cond"] if case["guidance"] == 1.0 else ["cond", "uncond"]
    steps = len(expected.sigmas) - 1
    for step in range(steps):
        kinds = [c[1] for c in calls if c[0] == step]
        assert kinds == ["source"] * 32 + ["edit"] * 32, kinds
        rows = {c[3] for c in calls if c[0] == step and c[1] == "edit"}
        assert len(rows) == 1 and sorted(next(iter(rows))) == roles
    maps = job.runs[0].maps
    assert maps.per_layer().keys() == expected.maps.per_layer().keys() and len(maps.per_layer()) == 16
    assert relative(maps.average(), expected.maps.average()) < 1e-3
    assert snapshot(model) == before


def test_matched_sampler_refuses_a_foreign_schedule(comfy_parts, case):
    samplers = node_module("matched_sampler")
    job = samplers.MatchedJob(comfy_parts["model"], comfy_parts["clip_vision"], comfy_parts["vae"], case["inverted"],
                              MatchSettings())
    x = torch.zeros(*case["inversion"].latents.shape[2:])
    with pytest.raises(ValueError, match="KarrasScheduler"):
        samplers.matched_function(lambda *a, **k: None, x, torch.tensor([5.0, 1.0, 0.0]), job=job)
    with pytest.raises(ValueError, match="descending"):
        samplers.matched_function(lambda *a, **k: None, x, torch.tensor([1.0, 5.0]), job=job)
