"""The edit stages of tools/official_parity.py (not part of the pack): a single-clip edit and a two-clip
edit with skip-interval, each with a motion LoRA, on the official side (`P2PStableVideoDiffusionPipeline`
with the official attention stores and controllers, as `main.py` wires them) and on ours (`invert_clip`,
`edit_clip`, `Clip0`), same tiny float64 weights, same inputs.

Official-side patches, printed when applied:
  - diffusers 0.25.1 builds the temporal cross-attention context of a batch of 2 position-major (rows
    p*B + b where the hidden states are b*HW + p; fixed in later diffusers): under CFG the uncond and cond
    rows get each other's CLIP context. A pre-hook on every temporal block re-orders that context
    batch-major, the later diffusers' order;
  - the edit's conditioning noise (`randn_tensor` of a batch-2 latent, second half used) is the core's draw
    (`editing.noised_conditioning`), the same noise on both sides as for SARP;
  - the P2P Euler step and `spatial_attention_matching` keep float64 where they cast to float32 (an upcast
    from the fp16 the official code runs in; in float64 a 6e-8 rounding per step that the random tiny
    UNet amplifies, as in the inversion). Without it the matching also fails outright: it multiplies
    float64 probabilities by float32 values, which only the official run's CUDA autocast reconciles;
  - `_encode_vae_image` casts the pipeline's float32 pixels to the float64 VAE (an exact cast).
"""

import copy
from pathlib import Path

# config/customize_subsequent_edit.yaml: attention_matching_params / long_video_params registered_modules
MATCHED = {"BasicTransformerBlock": ["attn1"], "TemporalBasicTransformerBlock": ["attn1"]}
SKIP = {"BasicTransformerBlock": None, "TemporalBasicTransformerBlock": ["attn1"]}
CONTROL_MODE = {"spatial_self": "masked_copy", "temporal_self": "copy_v2"}
FPS, LORA_RANK = 7, 4


# ----------------------------------------------------------------------------------------------
# Official side


def fix_temporal_context(unet):
    """Re-order diffusers 0.25.1's position-major temporal cross-attention context batch-major (see above)."""
    import torch
    shape = {}

    def remember(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        indicator = kwargs.get("image_only_indicator")
        shape["batch"], shape["tokens"] = indicator.shape[0], hidden.shape[-2] * hidden.shape[-1]

    def reorder(module, args, kwargs):
        context = kwargs.get("encoder_hidden_states")
        batch, tokens = shape["batch"], shape["tokens"]
        if context is not None and batch > 1:
            kwargs = dict(kwargs, encoder_hidden_states=context.reshape(tokens, batch, *context.shape[1:])
                          .transpose(0, 1).reshape(batch * tokens, *context.shape[1:]))
        return args, kwargs

    count = 0
    for module in unet.modules():
        if type(module).__name__ == "TransformerSpatioTemporalModel":
            module.register_forward_pre_hook(remember, with_kwargs=True)
            for block in module.temporal_transformer_blocks:
                block.register_forward_pre_hook(reorder, with_kwargs=True)
                count += 1
    print(f"[official side patched] diffusers 0.25.1 temporal cross-attention context made batch-major "
          f"in {count} temporal blocks (position-major under CFG is a bug fixed in later diffusers)")
    del torch


def float64_kept(function):
    """`function` with its casts of float64 tensors to float32 (`.to(torch.float32)`, `.type(torch.float32)`)
    left out: the official Euler step and spatial matching compute in float32 by design (an upcast from
    the fp16 they run in), which in a float64 comparison is a rounding of 6e-8 per step."""
    import functools
    import torch

    def keep(tensor, dtype):
        return tensor.dtype == torch.float64 and dtype is torch.float32

    @functools.wraps(function)
    def wrapped(*args, **kwargs):
        to, type_ = torch.Tensor.to, torch.Tensor.type
        torch.Tensor.to = lambda self, *a, **k: self if (a and keep(self, a[0]) and len(a) == 1 and not k) \
            else to(self, *a, **k)
        torch.Tensor.type = lambda self, dtype=None, *a, **k: self if keep(self, dtype) else type_(self, dtype, *a, **k)
        try:
            return function(*args, **kwargs)
        finally:
            torch.Tensor.to, torch.Tensor.type = to, type_
    return wrapped


def _registered(table):
    return copy.deepcopy(table)  # register_attention_control edits its dicts in place


def official_inversion(pipe, clip, seed, steps, store, consistency, float64_sigmas):
    """inverse_video's steps with its controllers: SARP, posterior sample, euler_inversion. Returns the
    inversion noise as inverse_video returns it (z_T / sqrt(sigma_max^2 + 1))."""
    import torch
    from i2vedit.prompt_attention import attention_util
    from i2vedit.utils.euler_utils import euler_inversion
    from i2vedit.utils.model_utils import tensor_to_vae_latent
    from i2vedit.utils.svd_util import SmoothAreaRandomDetection
    attention_util.register_attention_control(pipe.unet, store, consistency, find_modules=_registered(MATCHED),
                                              consistency_find_modules=_registered(SKIP))
    store.LOW_RESOURCE = True
    video = clip[None].float()
    video_for_inv = torch.cat([video[:, :1], video[:, :1], video], dim=1)
    torch.manual_seed(seed)
    indx = SmoothAreaRandomDetection("cpu", dtype=torch.float32).detection(video_for_inv, 0.001)
    noise = torch.randn(video_for_inv.shape, dtype=video_for_inv.dtype)
    video_for_inv[indx] = video_for_inv[indx] + noise[indx] * 0.005
    video_for_inv = video_for_inv.clamp(-1, 1)
    firstframe, keyframe, frames = video_for_inv.tensor_split([1, 2], dim=1)
    latents = tensor_to_vae_latent(frames.double(), pipe.vae)
    trajectory = euler_inversion(pipe, float64_sigmas(copy.deepcopy(pipe.scheduler)), latents, steps,
                                 image=keyframe[:, 0], firstframe=firstframe[:, 0], controller=store,
                                 consistency_controller=consistency)
    attention_util.register_attention_control(pipe.unet, store, consistency, find_modules=_registered(MATCHED),
                                              consistency_find_modules=_registered(SKIP), undo=True)
    return trajectory[-1]


def official_edit(pipe, store, previous, save_kv, keyframe, image_latents, noise, cond_noise, work, name, steps,
                  seed, thresholds, float64_sigmas):
    """One clip's edit as main.py runs it (AttentionControlEdit + ConsistencyAttentionControl on the P2P
    pipeline). Returns the final latent and the consistency controller (clip 0's K/V store for clip 1)."""
    import torch
    from i2vedit.prompt_attention import attention_util
    from i2vedit.utils import model_utils
    edit = attention_util.AttentionControlEdit(
        num_steps=steps, cross_replace_steps=0.0, temporal_self_replace_steps=1.0, spatial_self_replace_steps=1.0,
        mask_thr=list(thresholds), temporal_step_thr=[0.5, 0.8], control_mode=CONTROL_MODE,
        spatial_attention_chunk_size=1, additional_attention_store=store, use_inversion_attention=True,
        save_self_attention=False, save_latents=False, latent_blend=False, disk_store=False)
    edit.spatial_attention_matching = float64_kept(edit.spatial_attention_matching)
    consistency = attention_util.ConsistencyAttentionControl(
        additional_attention_store=previous, use_inversion_attention=False, save_self_attention=save_kv,
        save_latents=False, disk_store=True, store_path=str(work / "official_stores" / f"edit_kv_{name}"))
    pipe.scheduler = float64_sigmas(model_utils.P2PEulerDiscreteScheduler.from_config(pipe.scheduler.config))
    pipe.scheduler.step = float64_kept(pipe.scheduler.step)
    pipe.scheduler.controller = [edit, consistency]
    attention_util.register_attention_control(pipe.unet, edit, consistency, find_modules=_registered(MATCHED),
                                              consistency_find_modules=_registered(SKIP))
    randn_tensor = model_utils.randn_tensor

    def same_noise(shape, *args, **kwargs):  # the conditioning noise: batch 2, second half used
        drawn = randn_tensor(shape, *args, **kwargs)
        if len(shape) == 4 and shape[0] == 2:
            return torch.cat([drawn[:1], cond_noise.to(drawn)])
        return drawn
    model_utils.randn_tensor = same_noise
    try:
        out = pipe(keyframe, edited_firstframe=keyframe, image_latents=image_latents, width=keyframe.size[0],
                   height=keyframe.size[1], num_frames=noise.shape[1], num_inference_steps=steps, decode_chunk_size=8,
                   motion_bucket_id=127, fps=FPS, noise_aug_strength=0.02, max_guidance_scale=2.5,
                   generator=torch.Generator().manual_seed(seed), latents=noise, output_type="latent")
    finally:
        model_utils.randn_tensor = randn_tensor
        attention_util.register_attention_control(pipe.unet, edit, consistency, find_modules=_registered(MATCHED),
                                                  consistency_find_modules=_registered(SKIP), undo=True)
    return out.latents, consistency


def official_lora_unet(work, seed, dtype):
    """A UNet with the official temporal LoRA injected (LoraHandler, as initialize_pipeline does), its up and
    down weights drawn from `seed` (float32 values), and that LoRA saved as the official code saves it
    (`save_lora_weight`: the positional [up, down, ...] list) to work/lora{seed}.pt for our side."""
    import torch
    from diffusers import UNetSpatioTemporalConditionModel
    from i2vedit.utils.lora import extract_lora_ups_down, save_lora_weight
    from i2vedit.utils.lora_handler import LoraHandler
    unet = UNetSpatioTemporalConditionModel.from_pretrained(work / "unet")
    handler = LoraHandler(version="cloneofsimo", use_unet_lora=True, use_image_lora=False, save_for_webui=False,
                          only_for_webui=False, unet_replace_modules=["TemporalBasicTransformerBlock"],
                          image_encoder_replace_modules=None, lora_bias=None)
    handler.add_lora_to_model(True, unet, handler.unet_replace_modules, 0, "", r=LORA_RANK, scale=1.0)
    gen = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for up, down in extract_lora_ups_down(unet, target_replace_module=["TemporalBasicTransformerBlock"]):
            down.weight.copy_(torch.randn(down.weight.shape, generator=gen) / down.weight.shape[1] ** 0.5)
            up.weight.copy_(torch.randn(up.weight.shape, generator=gen) * 0.3 / LORA_RANK ** 0.5)
    save_lora_weight(unet, str(work / f"lora{seed}.pt"), target_replace_module=["TemporalBasicTransformerBlock"])
    return unet.to(dtype).eval()


def run_official_edits(work: Path, inputs, make_pipe, float64_sigmas, steps, seed):
    """Both edits on the official side; results into a dict."""
    import torch
    from PIL import Image
    from i2vedit.prompt_attention import attention_util
    from i2vedit.utils.model_utils import P2PStableVideoDiffusionPipeline
    e = inputs["edits"]
    base = make_pipe()
    fix_temporal_context(base.unet)
    stores, kv, noises = [], None, []
    for k, clip in enumerate(e["clips"]):  # inversion of each clip; clip 1 attends to clip 0's inversion K/V
        store = attention_util.AttentionStore(disk_store=True, save_latents=False, save_self_attention=True,
                                              store_path=str(work / "official_stores" / f"inversion_{k}"))
        consistency = attention_util.ConsistencyAttentionControl(
            additional_attention_store=kv, use_inversion_attention=False, save_self_attention=(k == 0),
            save_latents=False, disk_store=True, store_path=str(work / "official_stores" / f"inversion_kv_{k}"))
        noises.append(official_inversion(base, clip, seed, steps, store, consistency, float64_sigmas))
        stores.append(store)
        kv = consistency if k == 0 else kv
    out, previous, image_latents = {}, None, None
    for k, keyframe in enumerate(e["keyframes"]):
        unet = official_lora_unet(work, k, torch.float64)
        fix_temporal_context(unet)
        pipe = P2PStableVideoDiffusionPipeline(vae=base.vae, image_encoder=base.image_encoder, unet=unet,
                                               scheduler=copy.deepcopy(base.scheduler),
                                               feature_extractor=base.feature_extractor)
        encode = pipe._encode_vae_image
        pipe._encode_vae_image = lambda image, *a, **kw: encode(image.double(), *a, **kw)
        image = Image.fromarray(keyframe.permute(1, 2, 0).numpy())
        latent, consistency = official_edit(pipe, stores[k], previous, k == 0, image, image_latents, noises[k],
                                            e["cond_noise"], work, str(k), steps, seed, e["thresholds"], float64_sigmas)
        out[f"edit{k}"] = latent[0].double()
        previous, image_latents = (consistency if k == 0 else previous), latent[:, -1:]
    return out


# ----------------------------------------------------------------------------------------------
# Our side


def make_edit_inputs(frames, height, width, seed):
    """Two source clips, an 8-bit edited keyframe per clip, and the edit's conditioning noise as the core
    draws it (`editing.noised_conditioning`: shape (1, 1, 4, h, w) from the edit seed)."""
    import torch
    from i2vedit_core.tiny import synthetic_clip
    video = synthetic_clip(2 * frames, height, width, seed=4)
    clips = [video[:frames], video[frames:]]
    keyframes = []
    for k in range(2):
        frame = clips[0][0].clone()
        frame[:, 8 + 8 * k:40 + 8 * k, 16:48] = torch.tensor([0.8, -0.5, 0.2 * k]).view(3, 1, 1)
        keyframes.append(((frame + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))
    cond_noise = torch.randn((1, 1, 4, height // 8, width // 8), generator=torch.Generator().manual_seed(seed))[0]
    return dict(clips=clips, keyframes=keyframes, thresholds=(0.3, 0.5), cond_noise=cond_noise)


def run_our_edits(work: Path, inputs, backend, steps, seed, scale):
    """Both edits on our side under the `official` numerics; clip 0 under the defaults, and under the
    defaults' edit settings with the official inversion."""
    import torch
    from i2vedit_core.conditioning import MicroConditioning, latent_conditioning
    from i2vedit_core.editing import Clip0, edit_clip
    from i2vedit_core.inversion import invert_clip
    from i2vedit_core.lora import load_official_lora
    from i2vedit_core.pipeline import PipelineSettings
    from i2vedit_core.presets import with_numerics
    from dataclasses import replace
    e = inputs["edits"]
    out = {}
    for numerics in ("official", "default", "default_edit"):
        settings = with_numerics(PipelineSettings(), numerics.replace("_edit", ""))
        if numerics == "default_edit":  # the defaults' edit choices (D1-D3) on the official inversion
            settings = replace(settings, inversion=with_numerics(settings, "official").inversion)
        edit = replace(settings.edit, seed=seed, matching=replace(settings.edit.matching, use_triton=False,
                                                                   thresholds=tuple(e["thresholds"])))
        inversion = replace(settings.inversion, steps=steps, seed=seed)
        inversions = [invert_clip(backend, e["clips"][0], inversion)]
        results, image_latent = [], None
        for k, keyframe in enumerate(e["keyframes"]):
            frame = (keyframe.float() / 255 * 2 - 1).double()  # the pipeline's PIL preprocessing, float32
            lora = load_official_lora(str(work / f"lora{k}.pt"))
            _load_float64(backend, lora, "clip")
            embeds = backend.image_embedding(frame[None])
            latent = backend.encode(frame[None]) / scale if image_latent is None else image_latent
            cond = latent_conditioning(embeds, latent, len(e["clips"][k]), MicroConditioning(fps_id=FPS - 1))
            clip0 = None
            if k == 1:
                _load_float64(backend, load_official_lora(str(work / "lora0.pt")), "clip0")
                clip0 = Clip0.of(inversions[0], results[0])
                inversions.append(invert_clip(backend, e["clips"][1], inversion, clip0=inversions[0]))
            results.append(edit_clip(backend, inversions[k], cond, edit, lora_scale=1.0, clip0=clip0))
            image_latent = results[-1].latent[:, -1] / scale
            if numerics != "official":
                break
        out.update({f"edit{k}" + ("" if numerics == "official" else "_" + numerics): r.latent[0].double()
                    for k, r in enumerate(results)})
    return out


def _load_float64(backend, lora, slot):
    """The LoRA in the float64 model's precision (the adapters are float32 by design; exact for these values)."""
    backend.load_lora(lora, slot=slot)
    for name, module in backend.unet.named_modules():
        if ".lora_A." in name + "." or ".lora_B." in name + ".":
            module.double()
