"""Parity of this pack against the official I2VEdit code, stage by stage (not part of the pack).

    python tools/official_parity.py --official PATH/TO/I2VEdit --official-python PATH/TO/python [--work DIR]

Runs only when given both paths and fetches nothing. Tiny random SVD-topology weights (float64) are
built once by the official Python (diffusers 0.25.1), then the official functions and ours run on the
same weights and inputs in two processes, and a per-stage table of relative errors is printed.
Without the paths it prints how to make the official environment.

Patches on the official side (the edit stages add theirs: tools/official_parity_edits.py, printed when
applied, among them diffusers 0.25.1's position-major temporal cross-attention context under CFG):
  - the scheduler keeps its Karras sigma table in float64 (diffusers 0.25.1 casts it to float32, a 6e-8
    rounding of every sigma; the row "the official code against itself" shows what it moves);
  - torchvision is stubbed (the official code imports it only for data loading; the official
    torchvision wheel does not load with a CPU torch);
  - the mask reshape of `spatial_attention_matching`, hard-coded to 9:16 latents, is made shape-agnostic
    (the masks are only stored for previews).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from official_parity_edits import float64_kept, make_edit_inputs, run_official_edits, run_our_edits  # noqa: E402 (tools/)

REPO = Path(__file__).resolve().parents[1]
HOW_TO = """The official side needs a Python with the official stack (CPU torch is enough):
    python3 -m venv offvenv
    offvenv/bin/pip install torch "diffusers==0.25.1" "peft==0.11.1" "transformers==4.36.2" \\
        "huggingface_hub<0.26" "accelerate==0.30.1" "numpy<2" einops omegaconf imageio safetensors scipy \\
        opencv-python-headless decord
(no torchvision: the harness stubs it.) Get the official tree (github.com/Vicky0522/I2VEdit) yourself; then
    python tools/official_parity.py --official PATH/TO/I2VEdit --official-python offvenv/bin/python"""

FRAMES, HEIGHT, WIDTH, STEPS, SEED = 3, 64, 64, 25, 23
# The UNet's output layer scaled down. A default random init gives v a gain of ~60 w.r.t. its input at
# sigma 0.1-10 (a trained SVD's is ~1), so 25 Euler steps amplify any difference 1e6-1e8-fold: the edit
# rows would measure that chaos rather than the code. Scaling conv_out scales that gain alike.
TAME = 0.1
UNET = dict(in_channels=8, out_channels=4, cross_attention_dim=32, addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=24, num_frames=14, sample_size=8, layers_per_block=2,
            down_block_types=["CrossAttnDownBlockSpatioTemporal"] * 3 + ["DownBlockSpatioTemporal"],
            up_block_types=["UpBlockSpatioTemporal"] + ["CrossAttnUpBlockSpatioTemporal"] * 3,
            block_out_channels=[32, 32, 32, 32], num_attention_heads=2)
VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
           block_out_channels=[32, 32, 32, 32], layers_per_block=1, latent_channels=4, sample_size=64)
# CLIP at 224: the official pipeline resizes to 224 whatever the encoder's size.
CLIP = dict(hidden_size=32, intermediate_size=37, projection_dim=32, num_hidden_layers=2, num_attention_heads=4,
            image_size=224, patch_size=32)
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 prediction_type="v_prediction", interpolation_type="linear", use_karras_sigmas=True,
                 sigma_min=0.002, sigma_max=700.0, timestep_spacing="leading", timestep_type="continuous",
                 steps_offset=1)

# ----------------------------------------------------------------------------------------------
# Official side (runs in the official Python with the official tree on sys.path)


def _stub_torchvision():
    import importlib.machinery
    import types
    try:
        import torchvision  # noqa: F401
        return
    except Exception:
        pass
    # diffusers/transformers first, so they decide "no torchvision" before the stub exists
    import diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion  # noqa: F401
    import transformers  # noqa: F401
    tv = types.ModuleType("torchvision")
    tv.__spec__ = importlib.machinery.ModuleSpec("torchvision", None)
    transforms = types.ModuleType("torchvision.transforms")
    for name in ("Resize", "Pad", "InterpolationMode", "Compose", "ToTensor", "Normalize", "CenterCrop",
                 "RandomCrop", "Lambda", "RandomHorizontalFlip"):
        setattr(transforms, name, type(name, (), {"BILINEAR": 2, "BICUBIC": 3, "NEAREST": 0}))
    functional = types.ModuleType("torchvision.transforms.functional")
    transforms.functional = functional
    tv.transforms = transforms
    sys.modules.update({"torchvision": tv, "torchvision.transforms": transforms,
                        "torchvision.transforms.functional": functional})


def build_weights(work: Path):
    import torch
    from diffusers import AutoencoderKLTemporalDecoder, EulerDiscreteScheduler, UNetSpatioTemporalConditionModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection
    torch.manual_seed(0)
    unet = UNetSpatioTemporalConditionModel(**UNET)
    with torch.no_grad():  # a tame output layer: see TAME
        unet.conv_out.weight.mul_(TAME), unet.conv_out.bias.mul_(TAME)
    unet.save_pretrained(work / "unet")
    torch.manual_seed(1)
    AutoencoderKLTemporalDecoder(**VAE).save_pretrained(work / "vae")
    torch.manual_seed(2)
    CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP)).save_pretrained(work / "image_encoder")
    CLIPImageProcessor().save_pretrained(work / "feature_extractor")
    EulerDiscreteScheduler(**SCHEDULER).save_pretrained(work / "scheduler")


def _official_models(work: Path):
    import torch
    from diffusers import (AutoencoderKLTemporalDecoder, EulerDiscreteScheduler, StableVideoDiffusionPipeline,
                           UNetSpatioTemporalConditionModel)
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection
    unet = UNetSpatioTemporalConditionModel.from_pretrained(work / "unet").double().eval()
    vae = AutoencoderKLTemporalDecoder.from_pretrained(work / "vae").double().eval()
    clip = CLIPVisionModelWithProjection.from_pretrained(work / "image_encoder").double().eval()
    scheduler = EulerDiscreteScheduler.from_pretrained(work / "scheduler")
    pipe = StableVideoDiffusionPipeline(vae=vae, image_encoder=clip, unet=unet, scheduler=scheduler,
                                        feature_extractor=CLIPImageProcessor.from_pretrained(work / "feature_extractor"))
    # The pipeline preprocesses images in float32; the VAE here runs in float64 (exact cast).
    encode_vae_image = pipe._encode_vae_image
    pipe._encode_vae_image = lambda image, *args: encode_vae_image(image.double(), *args)
    return pipe


def run_official(official: Path, work: Path):
    _stub_torchvision()
    sys.path.insert(0, str(official))
    import copy
    import torch
    from i2vedit.utils.euler_utils import euler_inversion
    from i2vedit.utils.model_utils import tensor_to_vae_latent
    from i2vedit.utils.svd_util import SmoothAreaRandomDetection
    from i2vedit.utils.lora import LoraInjectedLinear
    from i2vedit.prompt_attention import attention_util

    torch.set_grad_enabled(False)
    inputs = torch.load(work / "inputs.pt", weights_only=True)
    out = {}
    pipe = _official_models(work)

    # schedule: the scheduler's Karras sigmas and the inversion's extrapolated sigma_0 (euler_loop)
    for name, scheduler in (("schedule", _float64_sigmas(copy.deepcopy(pipe.scheduler))),
                            ("schedule_f32", copy.deepcopy(pipe.scheduler))):
        scheduler.set_timesteps(STEPS)
        sigmas = scheduler.sigmas.double().clone()
        sigma0 = sigmas[-2] * sigmas[-2] / sigmas[-3]
        out[name] = torch.cat([sigma0[None], sigmas[:-1].flip(0)])  # ascending, as the inversion visits them

    # SARP (inverse_video's lines, with the official detector) and the inversion (euler_inversion)
    video = inputs["video"][None].float()  # (1, F, 3, H, W); inverse_video works in float32
    video_for_inv = torch.cat([video[:, :1], video[:, :1], video], dim=1)
    sard = SmoothAreaRandomDetection("cpu", dtype=torch.float32)
    torch.manual_seed(SEED)
    indx = sard.detection(video_for_inv, 0.001)
    noise = torch.randn(video_for_inv.shape, dtype=video_for_inv.dtype)
    video_for_inv[indx] = video_for_inv[indx] + noise[indx] * 0.005
    video_for_inv = video_for_inv.clamp(-1, 1)
    out["sarp"] = video_for_inv[0].clone()
    firstframe, keyframe, clip = video_for_inv.tensor_split([1, 2], dim=1)
    latents = tensor_to_vae_latent(clip.double(), pipe.vae)
    rng = torch.get_rng_state()  # the conditioning noise is drawn inside; both runs draw the same
    for name, make in (("inversion", lambda: _float64_sigmas(copy.deepcopy(pipe.scheduler))),
                       ("inversion_f32_sigmas", lambda: copy.deepcopy(pipe.scheduler))):
        torch.set_rng_state(rng)
        trajectory = euler_inversion(pipe, make(), latents, STEPS, image=keyframe[:, 0], firstframe=firstframe[:, 0])
        # the last entry is divided by sqrt(sigma_max^2 + 1); undo it to compare latents at sigma_max
        trajectory[-1] = trajectory[-1] * (float(sigmas[0]) ** 2 + 1) ** 0.5
        out[name] = torch.stack([t[0].double() for t in trajectory])

    # one spatial matching layer (AttentionControlEdit.spatial_attention_matching, masked_copy)
    m = inputs["matching"]
    attention_util.rearrange = _shape_agnostic_rearrange(attention_util.rearrange)
    store = type("Store", (), {})()
    store.attention_store_all_step = [{"down_spatial_q_self": [m["q0"]], "down_spatial_k_self": [m["k0"]]}]
    control = attention_util.AttentionControlEdit(num_steps=1, cross_replace_steps=0.0, temporal_self_replace_steps=1.0,
                                                  spatial_self_replace_steps=1.0, additional_attention_store=store,
                                                  use_inversion_attention=True, save_self_attention=False,
                                                  mask_thr=list(m["thr"]), control_mode={"spatial_self": "masked_copy",
                                                                                         "temporal_self": "copy_v2"})
    control.cur_step = 0
    match = float64_kept(control.spatial_attention_matching)  # float64 kept, as in the edit stages
    out["matching"] = match("down", "spatial", False, m["q"], m["k"], m["v"], None, mode="masked_copy").double()

    # LoRA forward/backward (LoraInjectedLinear, dropout 0.1 on the branch output, mask fixed by the seed)
    lo = inputs["lora"]
    with torch.enable_grad():
        layer = LoraInjectedLinear(lo["w"].shape[1], lo["w"].shape[0], bias=True, r=lo["down"].shape[0],
                                   dropout_p=0.1).double()
        with torch.no_grad():
            layer.linear.weight.copy_(lo["w"]), layer.linear.bias.copy_(lo["b"])
            layer.lora_down.weight.copy_(lo["down"]), layer.lora_up.weight.copy_(lo["up"])
        layer.train()
        torch.manual_seed(lo["seed"])
        y = layer(lo["x"])
        (y * lo["g"]).sum().backward()
    out["lora"] = dict(y=y.detach(), down=layer.lora_down.weight.grad, up=layer.lora_up.weight.grad)
    out.update(run_official_edits(work, inputs, lambda: _official_models(work), _float64_sigmas, STEPS, SEED))
    torch.save(out, work / "official.pt")


def _float64_sigmas(scheduler):
    """The scheduler with its own Karras sigmas and c_noise timesteps kept in float64 (diffusers 0.25.1 casts
    the table to float32: a 6e-8 rounding of every sigma that the random tiny UNet's inversion amplifies to
    3e-3 by sigma_max, so a float64 comparison needs the table in float64 on both sides)."""
    import numpy as np
    import torch
    set_timesteps = scheduler.set_timesteps

    def patched(steps, device=None):
        set_timesteps(steps, device=device)
        train = (((1 - scheduler.alphas_cumprod) / scheduler.alphas_cumprod) ** 0.5).numpy()
        karras = torch.from_numpy(scheduler._convert_to_karras(in_sigmas=train[::-1].copy(),
                                                                num_inference_steps=steps))
        scheduler.timesteps = torch.Tensor([0.25 * sigma.log() for sigma in karras])
        scheduler.sigmas = torch.cat([karras, torch.zeros(1, dtype=karras.dtype)])
    scheduler.set_timesteps = patched
    return scheduler


def _shape_agnostic_rearrange(rearrange):
    def patched(tensor, pattern, **axes):
        if pattern == "b 1 (h w) 1 -> h (b w)":  # masks kept for previews only
            axes = dict(axes, h=1)
        return rearrange(tensor, pattern, **axes)
    return patched

# ----------------------------------------------------------------------------------------------
# Our side (this repository's Python)


def make_inputs(work: Path):
    import torch
    from i2vedit_core.tiny import synthetic_clip
    gen = torch.Generator().manual_seed(5)
    f, h, n, d = 2, 2, 16, 8
    matching = {name: torch.randn(rows, h, n, d, generator=gen, dtype=torch.float64)
                for name, rows in (("q", 2 * f), ("k", 2 * f), ("v", 2 * f), ("q0", f))}
    matching["k0"] = matching["k"][f:] + 0.3 * torch.randn(f, h, n, d, generator=gen, dtype=torch.float64)
    matching["thr"] = (0.3, 0.5)
    lora = dict(w=torch.randn(12, 10, generator=gen, dtype=torch.float64),
                b=torch.randn(12, generator=gen, dtype=torch.float64),
                down=torch.randn(4, 10, generator=gen, dtype=torch.float64) / 4,
                up=torch.randn(12, 4, generator=gen, dtype=torch.float64),
                x=torch.randn(3, 5, 10, generator=gen, dtype=torch.float64),
                g=torch.randn(3, 5, 12, generator=gen, dtype=torch.float64), seed=11)
    torch.save(dict(video=synthetic_clip(FRAMES, HEIGHT, WIDTH, seed=3), matching=matching, lora=lora,
                    edits=make_edit_inputs(FRAMES, HEIGHT, WIDTH, SEED)), work / "inputs.pt")


def run_ours(work: Path):
    import torch
    from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel
    from transformers import CLIPVisionModelWithProjection
    from i2vedit_core.attention.matching import matched_attention, threshold_ramp
    from i2vedit_core.backends.diffusers import DiffusersBackend
    from i2vedit_core.inversion import InversionSettings, invert_clip
    from i2vedit_core.sarp import perturb_smooth_areas
    from i2vedit_core.schedule import inversion_sigmas

    torch.set_grad_enabled(False)
    inputs = torch.load(work / "inputs.pt", weights_only=True)
    backend = DiffusersBackend(UNetSpatioTemporalConditionModel.from_pretrained(work / "unet").double(),
                               AutoencoderKLTemporalDecoder.from_pretrained(work / "vae").double(),
                               CLIPVisionModelWithProjection.from_pretrained(work / "image_encoder").double(),
                               torch.device("cpu"))
    out = {"schedule": inversion_sigmas(STEPS).double()}
    video = inputs["video"]
    frames = torch.cat([video[:1], video[:1], video])
    out["sarp"] = perturb_smooth_areas(frames, generator=torch.Generator().manual_seed(SEED))
    for name, official in (("inversion", True), ("inversion_default", False)):
        settings = InversionSettings(steps=STEPS, seed=SEED, cond_8bit=official, vae_sample=official)
        out[name] = invert_clip(backend, video, settings).latents[:, 0].double()

    m = inputs["matching"]
    f = m["q0"].shape[0]
    thresholds = threshold_ramp(m["thr"], f, official=True)
    cond, _ = matched_attention(m["q0"], m["k0"], m["q"][f:], m["k"][f:], m["v"][f:], thresholds, use_triton=False)
    uncond = torch.nn.functional.scaled_dot_product_attention(m["q"][:f], m["k"][:f], m["v"][:f])
    out["matching"] = torch.cat([uncond, cond]).double()
    out["matching_default"] = torch.cat([uncond, matched_attention(
        m["q0"], m["k0"], m["q"][f:], m["k"][f:], m["v"][f:], threshold_ramp(m["thr"], f), use_triton=False)[0]]).double()
    out["lora"] = _our_lora(inputs["lora"])
    out.update(run_our_edits(work, inputs, backend, STEPS, SEED, backend.latent_scale))
    torch.save(out, work / "ours.pt")


def _our_lora(lo):
    """The diffusers backend's adapter (peft + OutputDropoutLinear) on one Linear of the same weights."""
    import torch
    from peft import LoraConfig, inject_adapter_in_model
    from i2vedit_core.backends import diffusers_lora

    model = torch.nn.Sequential()
    model.add_module("proj", torch.nn.Linear(lo["w"].shape[1], lo["w"].shape[0]).double())
    config = LoraConfig(r=lo["down"].shape[0], lora_alpha=lo["down"].shape[0], lora_dropout=0.0,
                        init_lora_weights=False, target_modules=["proj"])
    inject_adapter_in_model(config, model, adapter_name=diffusers_lora.ADAPTER)
    layer = model.proj
    layer.lora_B[diffusers_lora.ADAPTER] = diffusers_lora.OutputDropoutLinear(lo["down"].shape[0], lo["w"].shape[0], 0.1)
    with torch.no_grad():
        layer.base_layer.weight.copy_(lo["w"]), layer.base_layer.bias.copy_(lo["b"])
        layer.lora_A[diffusers_lora.ADAPTER].double().weight.copy_(lo["down"])
        layer.lora_B[diffusers_lora.ADAPTER].double().weight.copy_(lo["up"])
    model.train()
    with torch.enable_grad():
        torch.manual_seed(lo["seed"])
        y = model(lo["x"])
        (y * lo["g"]).sum().backward()
    return dict(y=y.detach(), down=layer.lora_A[diffusers_lora.ADAPTER].weight.grad,
                up=layer.lora_B[diffusers_lora.ADAPTER].weight.grad)

# ----------------------------------------------------------------------------------------------
# Driver


def relative(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def table(work: Path) -> str:
    import torch
    theirs, ours = torch.load(work / "official.pt", weights_only=True), torch.load(work / "ours.pt", weights_only=True)
    rows = [("schedule (25 Karras sigmas + extrapolated sigma_0)", relative(ours["schedule"], theirs["schedule"])),
            ("(the same, official table as diffusers 0.25.1 stores it: float32)",
             relative(ours["schedule"], theirs["schedule_f32"])),
            ("SARP (same noise; F+2 frames)", relative(ours["sarp"], theirs["sarp"].to(ours["sarp"]))),
            ("inversion, official numerics: latent at every sigma (26)",
             relative(ours["inversion"], theirs["inversion"])),
            ("inversion, official numerics: z_T",
             relative(ours["inversion"][-1], theirs["inversion"][-1])),
            ("(the official code against itself: its float32 sigma table vs float64, z_T)",
             relative(theirs["inversion_f32_sigmas"][-1], theirs["inversion"][-1])),
            ("single-clip edit (25 steps, matching, LoRA, CFG): final latent",
             relative(ours["edit0"], theirs["edit0"])),
            ("two-clip edit, skip-interval: clip 1's final latent (attends to edited clip 0's K/V)",
             relative(ours["edit1"], theirs["edit1"])),
            ("one spatial matching layer (masked_copy), official ramp f/F",
             relative(ours["matching"], theirs["matching"])),
            ("LoRA forward, dropout 0.1 on the branch output (same mask)",
             relative(ours["lora"]["y"], theirs["lora"]["y"])),
            ("LoRA backward: grad of down / up",
             max(relative(ours["lora"]["down"], theirs["lora"]["down"]),
                 relative(ours["lora"]["up"], theirs["lora"]["up"]))),
            ("default numerics vs official code: inversion z_T",
             relative(ours["inversion_default"][-1], theirs["inversion"][-1])),
            ("default numerics vs official code: matching layer (ramp reaches thr1)",
             relative(ours["matching_default"], theirs["matching"])),
            ("`official` preset vs default: single-clip edit (inversion + edit, same inputs)",
             relative(ours["edit0_default"], ours["edit0"])),
            ("  of which the edit settings (D1-D3: source sigma, stage-2 layers, ramp), same inversion",
             relative(ours["edit0_default_edit"], ours["edit0"]))]
    lines = ["| stage | relative error (L2, float64 weights) |", "|---|---|"]
    lines += [f"| {name} | {value:.1e} |" for name, value in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", help="path to the official I2VEdit tree")
    parser.add_argument("--official-python", help="a Python with diffusers 0.25.1 / peft 0.11.1 / transformers 4.36")
    parser.add_argument("--work", help="folder for weights and outputs (default: a temporary one)")
    parser.add_argument("--reuse", action="store_true", help="keep the official outputs already in --work")
    parser.add_argument("--side", choices=("official", "weights"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.side:
        work = Path(args.work)
        build_weights(work) if args.side == "weights" else run_official(Path(args.official), work)
        return 0
    if not (args.official and args.official_python):
        print(HOW_TO)
        return 2
    work = Path(args.work or tempfile.mkdtemp(prefix="i2vedit_parity_"))
    work.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(REPO))
    env = dict(os.environ, PYTHONPATH="")
    me = str(Path(__file__).resolve())
    if not (work / "unet").is_dir():
        subprocess.run([args.official_python, me, "--side", "weights", "--work", str(work)], check=True, env=env)
    if not (args.reuse and (work / "official.pt").is_file()):
        make_inputs(work)
        subprocess.run([args.official_python, me, "--side", "official", "--official", args.official, "--work", str(work)],
                       check=True, env=env, cwd=str(work))
    run_ours(work)
    print(table(work))
    versions = subprocess.run([args.official_python, "-c", "import diffusers, peft, transformers, torch; print("
                               "'official side: diffusers', diffusers.__version__, 'peft', peft.__version__, "
                               "'transformers', transformers.__version__, 'torch', torch.__version__)"],
                              capture_output=True, text=True, env=env).stdout.strip()
    import diffusers, peft, torch, transformers  # noqa: E401
    print(versions)
    print("our side: diffusers", diffusers.__version__, "peft", peft.__version__, "transformers",
          transformers.__version__, "torch", torch.__version__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
