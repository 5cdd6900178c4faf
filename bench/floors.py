"""Independent eager floors: the host's plain calls, with none of this pack's code in the timed path.

diffusers: `unet(...)` with its default attention processors, a peft rank-32 adapter on the temporal
Linears for the training step, `vae.decode`. ComfyUI: `apply_model` on a fresh clone of the input
MODEL loaded through ComfyUI's model management (no pack patch installed), a bare low-rank wrapper
object-patched onto the same temporal Linears for the training step, `VAE.decode`. Training steps
run under bf16 autocast with fp32 adapter weights, no checkpointing, AdamW on the adapter; inputs
are random (speed does not depend on values, but zeros can run faster: METHOD.md).
"""

import re
import time
from typing import Callable, Dict

import torch
import torch.nn.functional as F

TEMPORAL_LINEAR = re.compile(r".*\.(ff_in\.net\.0\.proj|ff_in\.net\.2|attn[12]\.to_[qkv]|attn[12]\.to_out\.0|"
                             r"ff\.net\.0\.proj|ff\.net\.2)$")
RANK = 32


def timed(fn: Callable, reps: int = 3, warmup: int = 1) -> float:
    """Median seconds of `reps` calls after `warmup` (synchronised on CUDA)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _adamw_step(loss, optimizer):
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# --- diffusers -------------------------------------------------------------------------------------

def diffusers_floors(unet, vae, frames: int, hw, train_hw, reps: int = 3) -> Dict[str, float]:
    device, dtype = next(unet.parameters()).device, next(unet.parameters()).dtype
    gen = torch.Generator(device).manual_seed(0)

    def inputs(batch, size):
        shape = (batch, frames, 8, size[0] // 8, size[1] // 8)
        return (torch.randn(shape, generator=gen, device=device, dtype=dtype),
                torch.randn(batch, 1, unet.config.cross_attention_dim, generator=gen, device=device, dtype=dtype),
                torch.tensor([[5.0, 127.0, 0.02]] * batch, device=device, dtype=dtype))

    t = torch.tensor(0.25, device=device)
    out = {}
    with torch.no_grad():
        for batch in (1, 2, 3):
            x, ctx, ids = inputs(batch, hw)
            out[f"b{batch}"] = timed(lambda: unet(x, t, ctx, ids, return_dict=False), reps)
        z = torch.randn(frames, 4, hw[0] // 8, hw[1] // 8, generator=gen, device=device, dtype=vae.dtype)
        out["decode"] = sum(timed(lambda c=c: vae.decode(c, num_frames=len(c)), 1) for c in z.split(8))
    x, ctx, ids = inputs(1, train_hw)
    target = torch.randn(x.shape[:2] + (4,) + x.shape[3:], generator=gen, device=device)
    params = _attach_peft(unet)
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            v = unet(x, t, ctx, ids, return_dict=False)[0]
        _adamw_step((v.float() - target).pow(2).mean(), optimizer)

    try:
        out["train_step"] = timed(step, reps, warmup=2)
    finally:
        _detach_peft(unet)
    return out


def _attach_peft(unet):
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=RANK, lora_alpha=RANK, lora_dropout=0.0, target_modules=TEMPORAL_LINEAR.pattern
                        .replace(r".*\.(", r".*\.temporal_transformer_blocks\.\d+\.("))
    inject_adapter_in_model(config, unet, adapter_name="floor")
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    if len(params) != 2 * 192:
        raise AssertionError(f"peft floor adapted {len(params) // 2} Linears, SVD has 192 temporal ones")
    return params


def _detach_peft(unet):
    for name, module in list(unet.named_modules()):
        if hasattr(module, "base_layer") and hasattr(module, "lora_A"):
            parent, _, child = name.rpartition(".")
            setattr(unet.get_submodule(parent), child, module.base_layer)
    if hasattr(unet, "peft_config"):
        del unet.peft_config


# --- ComfyUI ---------------------------------------------------------------------------------------

def comfy_floors(model, vae, frames: int, hw, train_hw, reps: int = 3) -> Dict[str, float]:
    """`model`: the input MODEL; a fresh clone is loaded, so no pack patch is active."""
    import comfy.model_management as mm

    fresh = model.clone()
    mm.load_models_gpu([fresh])
    base = fresh.model
    device = fresh.load_device
    gen = torch.Generator(device).manual_seed(0)

    def inputs(batch, size):
        return comfy_inputs(base, device, batch, frames, size, gen)

    out = {}
    with torch.no_grad():
        for batch in (1, 2, 3):
            x, sigma, c = inputs(batch, hw)
            out[f"b{batch}"] = timed(lambda: base.apply_model(x, sigma, **c), reps)
        z = torch.randn(frames, 4, hw[0] // 8, hw[1] // 8, generator=gen, device=device)
        out["decode"] = sum(timed(lambda c=c: vae.decode(c), 1) for c in z.split(8))
    lora = fresh.clone()
    params = _bare_lora(lora)
    mm.load_models_gpu([lora])
    x, sigma, c = inputs(1, train_hw)
    target = torch.randn(x.shape, generator=gen, device=device)
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            v = lora.model.apply_model(x, sigma, **c)
        _adamw_step((v.float() - target).pow(2).mean(), optimizer)

    out["train_step"] = timed(step, reps, warmup=2)
    mm.load_models_gpu([fresh])  # unpatches the bare LoRA again
    return out


def comfy_inputs(base, device, batch: int, frames: int, size, gen):
    """(x, sigma, apply_model's keyword arguments) of one plain call on `batch` random videos of `frames` frames."""
    n = batch * frames
    shape = (n, 4, size[0] // 8, size[1] // 8)
    adm = base.encode_adm(fps=6.0, motion_bucket_id=127.0, augmentation_level=0.02).to(device)
    context = base.model_config.unet_config["context_dim"]
    return (torch.randn(shape, generator=gen, device=device), torch.full((n,), 1.0, device=device),
            dict(c_concat=torch.randn(shape, generator=gen, device=device),
                 c_crossattn=torch.randn(n, 1, context, generator=gen, device=device), y=adm.repeat(n, 1),
                 num_video_frames=frames))


def _bare_lora(patcher):
    """out = W x + up(down(x)) on every temporal Linear, as object patches; returns the fp32 parameters."""
    params = []
    for path, module in patcher.model.diffusion_model.named_modules():
        if ".time_stack.0." not in path or not TEMPORAL_LINEAR.fullmatch(path):
            continue
        down = torch.nn.Parameter(torch.randn(RANK, module.in_features, device=patcher.load_device) / RANK)
        up = torch.nn.Parameter(torch.zeros(module.out_features, RANK, device=patcher.load_device))

        def forward(x, *args, module=module, down=down, up=up, **kwargs):
            return type(module).forward(module, x, *args, **kwargs) + F.linear(F.linear(x, down), up)

        patcher.add_object_patch(f"diffusion_model.{path}.forward", forward)
        params += [down, up]
    if len(params) != 2 * 192:
        raise AssertionError(f"bare LoRA floor adapted {len(params) // 2} Linears, SVD has 192 temporal ones")
    return params
