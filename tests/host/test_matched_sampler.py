"""I2VEdit Matched Sampler in core SamplerCustomAdvanced vs the core's clip 0 of Propagate / Edit Video.

The same motion LoRA (a file loaded with ComfyUI's own LoRA loader onto the MODEL for the sampler; attached to
the backend for the core), the same MASK, the same matching and guidance settings and the conditioning of I2VEdit
Edit Conditioning: the sampler's latent must equal `edit_clip`'s (what `pipeline.propagate` runs for clip 0)
within 1e-5, with the same difference maps, and the shared model must be left as it was.
"""

import pytest
import torch

from i2vedit_core.lora import LoraSpec, motion_lora_from_pairs, save_motion_lora

from pack import node_classes, node_module

SIZE = 64
CLIP_WIDGETS = dict(frames_per_clip=3, overlap=1, working_width=SIZE, working_height=SIZE, fit="resize")
MATCH_WIDGETS = dict(preset="local", beta1=0.5, beta2=0.8, threshold_first=0.35, threshold_last=0.35,
                     min_guidance=1.0, max_guidance=2.5)
SEED = 3


def relative(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def run(node, **inputs):
    with torch.inference_mode():
        return node.execute(**inputs)


def random_lora(model, rank=2, seed=0):
    from i2vedit_core.backends.comfy_lora import adaptable_linears, targets

    gen = torch.Generator().manual_seed(seed)
    spec = LoraSpec(rank=rank)
    pairs = {path: (torch.randn(rank, i, generator=gen) * 0.2, torch.randn(o, rank, generator=gen) * 0.2)
             for path, (o, i) in targets(adaptable_linears(model.model.diffusion_model), spec).items()}
    return motion_lora_from_pairs(pairs, spec)


def with_lora_file(model, lora, folder):
    """What LoraLoaderModelOnly does with the saved file (strength 1)."""
    import comfy.sd
    import comfy.utils

    path = folder / "motion.safetensors"
    save_motion_lora(lora, str(path))
    return comfy.sd.load_lora_for_models(model, None, comfy.utils.load_torch_file(str(path)), 1.0, 0)[0]


@pytest.fixture(scope="module")
def nodes():
    return {cls.define_schema().node_id: cls for cls in node_classes()}


@pytest.fixture(scope="module")
def setup(comfy_parts, nodes, tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    base = torch.rand(1, SIZE, SIZE, 3, generator=g)
    frames = torch.cat([base.roll(i * 4, dims=2) for i in range(3)])
    edited = frames[:1].clone()
    edited[:, 16:40, 16:40] = torch.tensor([1.0, 0.0, 0.0])
    mask = torch.zeros(1, SIZE, SIZE)
    mask[:, 8:48, 8:48] = 1
    parts = dict(model=comfy_parts["model"], clip_vision=comfy_parts["clip_vision"], vae=comfy_parts["vae"])
    clips = run(nodes["I2VEditSourceClips"], frames=frames, **CLIP_WIDGETS)[0]
    inverted = run(nodes["I2VEditInvert"], clips=clips, steps=2, sarp=True, sarp_scale=0.005, random_seed=1,
                   **parts)[0]
    lora = random_lora(parts["model"])
    lora_model = with_lora_file(parts["model"], lora, tmp_path_factory.mktemp("loras"))
    return dict(parts=parts, frames=frames, edited=edited, mask=mask, inverted=inverted, lora=lora,
                lora_model=lora_model)


def core_clip0(setup, mask):
    """Clip 0 as pipeline.propagate edits it (edit_conditioning + edit_clip, LoRA at scale 1)."""
    from i2vedit_core.backends.comfy import ComfyBackend
    from i2vedit_core.editing import edit_clip
    from i2vedit_core.pipeline import check_edited_frames, edit_conditioning, latent_mask

    propagate = node_module("propagate")
    host = node_module("host")
    inverted, parts = setup["inverted"], setup["parts"]
    video = inverted.clips.video
    settings = propagate.edit_settings(random_seed=SEED, **MATCH_WIDGETS)
    edited = check_edited_frames(host.image_to_frames(setup["edited"], "edited"), video.fit)[0]
    backend = ComfyBackend(parts["model"], parts["clip_vision"], parts["vae"])
    try:
        with torch.inference_mode():
            backend.load_lora(setup["lora"])
            cond = edit_conditioning(backend, edited, None, None, len(video.clips[0]), inverted.settings.micro)
            result = edit_clip(backend, inverted.on(backend.device)[0], cond, settings, lora_scale=1.0,
                               mask=None if mask is None else latent_mask(mask, video))
    finally:
        backend.release()
    return result


def sample(setup, nodes, mask, model=None):
    import comfy.samplers
    from comfy.k_diffusion.sampling import get_sigmas_karras
    from comfy_extras.nodes_custom_sampler import SamplerCustomAdvanced

    model = setup["lora_model"] if model is None else model
    parts = dict(setup["parts"], model=model)
    positive, negative, latent = run(nodes["I2VEditEditConditioning"], inversion=setup["inverted"],
                                     edited_first_frame=setup["edited"], random_seed=SEED, **parts).args
    sampler = run(nodes["I2VEditMatchedSampler"], inversion=setup["inverted"], mask=mask, **parts,
                  **MATCH_WIDGETS).result[0]
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(7.0)  # replaced by the sampler's min/max guidance
    noise = type("DisableNoise", (), dict(seed=0, generate_noise=lambda self, l: torch.zeros_like(l["samples"])))()
    sigmas = get_sigmas_karras(2, 0.002, 700.0, 7.0)
    with torch.inference_mode():
        out = SamplerCustomAdvanced().sample(noise, guider, sampler, sigmas, latent)
    out = out.result if hasattr(out, "result") else out
    latent_scale = model.get_model_object("latent_format").scale_factor
    return out[0]["samples"].float()[None] * latent_scale, sampler.extra_options["job"]


def shared_state(model):
    import comfy.model_management as mm

    params = {n: (p, p.is_inference(), p.detach().clone()) for n, p in model.model.named_parameters()}
    loaded = [m for m in mm.current_loaded_models if m.model is not None and m.model.model is not model.model]
    return params, loaded


def assert_shared_state_kept(model, before, same_objects=True):
    import comfy.model_management as mm

    params, loaded = before
    after = dict(model.model.named_parameters())
    assert after.keys() == params.keys()
    for name, (p, inference, value) in params.items():
        assert after[name].is_inference() == inference and torch.equal(after[name], value), name
        assert not same_objects or after[name] is p, name
    # None removed by us; ComfyUI itself drops the entries of models that were garbage-collected meanwhile.
    assert all(any(m is entry for m in mm.current_loaded_models) for entry in loaded if entry.model is not None)


@pytest.mark.parametrize("masked", [True, False], ids=["mask", "no_mask"])
def test_matched_sampler_with_lora_model_and_mask_equals_edit_clip0(setup, nodes, masked):
    mask = setup["mask"] if masked else None
    expected = core_clip0(setup, mask)
    before = shared_state(setup["parts"]["model"])
    got, job = sample(setup, nodes, mask)
    assert relative(got, expected.latent) <= 1e-5, relative(got, expected.latent)
    maps = job.runs[0].maps
    assert maps.per_layer().keys() == expected.maps.per_layer().keys() and len(maps.per_layer()) == 16
    assert relative(maps.average(), expected.maps.average()) <= 1e-5
    source = setup["inverted"].inversions[0].latents[0]
    assert relative(expected.latent, source) > 0.05  # the edit moved away from the source
    outside = (setup["mask"][0, ::8, ::8] == 0) if masked else None
    if masked:  # the mask reached the loop: outside it the latent is the source's
        torch.testing.assert_close(got[..., outside], source[..., outside], rtol=0, atol=1e-6)
    # LoRA weight patches are (un)merged by ComfyUI's own loading, which makes new Parameter objects there
    assert_shared_state_kept(setup["parts"]["model"], before, same_objects=False)


def test_the_lora_on_the_model_is_used(setup, nodes):
    """Without the LoRA on MODEL the result differs: the sampler took it from MODEL, not from nowhere."""
    with_lora, _ = sample(setup, nodes, None)
    without, _ = sample(setup, nodes, None, model=setup["parts"]["model"])
    assert relative(with_lora, without) > 1e-4


def test_matched_sampler_refuses_a_foreign_schedule(setup):
    samplers = node_module("matched_sampler")
    edit = node_module("propagate").edit_settings(random_seed=0, **MATCH_WIDGETS)
    parts = setup["parts"]
    job = samplers.MatchedJob(parts["model"], parts["clip_vision"], parts["vae"], setup["inverted"], edit)
    x = torch.zeros(*setup["inverted"].inversions[0].latents.shape[2:])
    with pytest.raises(ValueError, match="KarrasScheduler with the inversion's steps"):
        samplers.matched_function(lambda *a, **k: None, x, torch.tensor([5.0, 1.0, 0.0]), job=job)
    with pytest.raises(ValueError, match="KarrasScheduler"):
        samplers.matched_function(lambda *a, **k: None, x, torch.tensor([1.0, 5.0]), job=job)
