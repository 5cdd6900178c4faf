"""Seconds per motion-LoRA training step, against a plain forward+backward floor measured in the same run.

Default: full-size random-weight SVD UNet (1.5 B params, bf16 weights, bf16 autocast, fp32 LoRA) on CUDA,
512x896, 14 frames, the default LoRA (rank 32, 192 Linears). Under 3 minutes on one H100:

    python bench/training_step.py                     # add --gradient-checkpointing to compare
    python bench/training_step.py --tiny              # tiny model on the CPU (smoke test, CI numbers)

Rows: `training_step` is i2vedit_core.training.training_step (sigma draw, conditioning noise, EDM-weighted
loss, backward, AdamW); `floor: unet fwd+bwd (LoRA)` calls the UNet directly with the same adapter and
takes a plain MSE backward (no optimiser); `floor: unet fwd+bwd (no LoRA)` backpropagates to the input of
the bare UNet. Speed does not depend on the weight values.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from i2vedit_core.backends import diffusers_lora  # noqa: E402
from i2vedit_core.backends.base import Conditioning  # noqa: E402
from i2vedit_core.backends.diffusers import DiffusersBackend  # noqa: E402
from i2vedit_core.lora import LoraSpec  # noqa: E402
from i2vedit_core.tiny import tiny_backend, tiny_clip, tiny_vae  # noqa: E402
from i2vedit_core.training import TrainingSettings, training_step  # noqa: E402


def full_size_backend(frames: int) -> DiffusersBackend:
    from diffusers import UNetSpatioTemporalConditionModel
    with torch.device("cuda"):  # random init on the GPU: seconds instead of minutes on the CPU
        unet = UNetSpatioTemporalConditionModel(num_frames=frames, sample_size=96)
    unet.to("cuda", torch.bfloat16)  # legacy-constructed tensors (AlphaBlender.mix_factor) ignore the device context
    return DiffusersBackend(unet, tiny_vae().cuda(), tiny_clip().cuda(), torch.device("cuda"))


def inputs(backend, frames: int, height: int, width: int):
    gen = torch.Generator().manual_seed(0)
    shape = (1, frames, 4, height // 8, width // 8)
    embed_dim = backend.unet.config.cross_attention_dim
    z0 = torch.randn(shape, generator=gen).to(backend.device)
    cond = Conditioning(torch.randn(1, 1, embed_dim, generator=gen).to(backend.device),
                        torch.randn(shape, generator=gen).to(backend.device),
                        torch.tensor([[6.0, 127.0, 0.02]], device=backend.device))
    return z0, cond


def timed(fn, warmup: int, steps: int, device) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - start) / steps


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def unet_fwd_bwd(backend, z0, cond, use_lora: bool):
    unet, dtype = backend.unet, backend.dtype
    x = torch.cat([z0, cond.image_latents], dim=2).to(dtype).requires_grad_(not use_lora)
    with torch.autocast(z0.device.type, dtype=torch.bfloat16, enabled=z0.device.type == "cuda"), \
            diffusers_lora.use_lora_scale(unet, 1.0 if use_lora else 0.0):
        v = unet(x, torch.tensor(0.1, device=z0.device), encoder_hidden_states=cond.image_embeds.to(dtype),
                 added_time_ids=cond.time_ids.to(dtype), return_dict=False)[0]
    v.float().pow(2).mean().backward()
    backend.unet.zero_grad(set_to_none=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny random model on the CPU")
    parser.add_argument("--frames", type=int, default=14)
    parser.add_argument("--height", type=int, default=None, help="default 512 (64 with --tiny)")
    parser.add_argument("--width", type=int, default=None, help="default 896 (64 with --tiny)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    args = parser.parse_args()
    height = args.height or (64 if args.tiny else 512)
    width = args.width or (64 if args.tiny else 896)
    if not args.tiny and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --tiny for the CPU model")
    torch.manual_seed(0)
    backend = tiny_backend(seed=0) if args.tiny else full_size_backend(args.frames)
    device = backend.device
    z0, cond = inputs(backend, args.frames, height, width)
    settings = TrainingSettings(gradient_checkpointing=args.gradient_checkpointing)
    backend.attach_lora(LoraSpec())
    optimizer = torch.optim.AdamW(backend.lora_parameters(), lr=settings.learning_rate,
                                  weight_decay=settings.weight_decay)
    gen = torch.Generator().manual_seed(0)
    lora_params = sum(p.numel() for p in backend.lora_parameters())
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), "
          f"{args.frames} frames at {height}x{width}, UNet {backend.dtype}, LoRA {lora_params / 1e6:.2f} M params "
          f"fp32, gradient checkpointing {args.gradient_checkpointing}, {args.steps} timed steps")
    cases = [("training_step", lambda: training_step(backend.denoise, optimizer, z0, cond, 0.7, settings, gen)),
             ("floor: unet fwd+bwd (LoRA)", lambda: unet_fwd_bwd(backend, z0, cond, True)),
             ("floor: unet fwd+bwd (no LoRA)", lambda: unet_fwd_bwd(backend, z0, cond, False))]
    print(f"{'case':32s} {'s/step':>8s} {'peak GiB':>9s}")
    with backend.lora_training(args.gradient_checkpointing):
        for name, fn in cases:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            try:
                seconds = timed(fn, args.warmup, args.steps, device)
            except torch.cuda.OutOfMemoryError:
                optimizer.zero_grad(set_to_none=True)
                print(f"{name:32s} {'OOM':>8s}")
                continue
            peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
            print(f"{name:32s} {seconds:8.3f} {peak:9.1f}")


if __name__ == "__main__":
    main()
