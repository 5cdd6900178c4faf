"""End to end on one 14-frame clip at 576x1024 with full-size random-weight SVD, against the compute floor.

    python bench/e2e.py                      # default mode
    python bench/e2e.py --skip-interval      # also a 2-clip video (clip 2 with skip-interval attention)
    python bench/e2e.py --memory 24gb        # the one-clip run under the 24gb memory tier

Stages: SARP + 25-step inversion; 250 motion-LoRA steps at 512x896; 25 matched denoising steps with CFG
and the recomputed source branch; VAE decode. The floor is measured in the same run on the same model:
25 x a plain batch-1 forward (inversion), 250 x a plain LoRA forward+backward at 512x896 (training),
25 x (a plain CFG batch-2 forward + a plain batch-1 forward) (editing). Speed does not depend on weight
values. Needs CUDA. Prints one table; about 5 minutes on an H100 (10 with --skip-interval).
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from i2vedit_core.backends.base import Conditioning  # noqa: E402
from i2vedit_core.backends.diffusers import DiffusersBackend  # noqa: E402
from i2vedit_core.backends.sgm_vae_keys import SVD_VAE_CONFIG  # noqa: E402
from i2vedit_core.inversion import InversionSettings  # noqa: E402
from i2vedit_core.lora import LoraSpec  # noqa: E402
from i2vedit_core.pipeline import (PipelineSettings, check_edited_frames, invert_video, prepare_video,  # noqa: E402
                                   propagate, train_loras)
from i2vedit_core.tiny import synthetic_clip  # noqa: E402
from i2vedit_core.training import TrainingSettings  # noqa: E402

DTYPE = torch.bfloat16


def full_size_backend() -> DiffusersBackend:
    from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    clip_config = CLIPVisionConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                   num_attention_heads=16, image_size=224, patch_size=14, projection_dim=1024,
                                   hidden_act="gelu")
    with torch.device("cuda"):  # random init on the GPU: seconds instead of minutes
        unet = UNetSpatioTemporalConditionModel(num_frames=14, sample_size=96)
        vae = AutoencoderKLTemporalDecoder(**SVD_VAE_CONFIG)
        clip = CLIPVisionModelWithProjection(clip_config)
    # legacy-constructed tensors (AlphaBlender.mix_factor) ignore the device context: move everything
    return DiffusersBackend(unet.to("cuda", DTYPE), vae.to("cuda", DTYPE), clip.to("cuda", DTYPE),
                            torch.device("cuda"))


def timed(fn, reps: int = 3, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps


def stage(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = fn()
    torch.cuda.synchronize()
    return result, time.perf_counter() - start, torch.cuda.max_memory_allocated() / 2**30


def floors(backend, frames: int, train_hw, steps: int, train_steps: int) -> dict:
    """Seconds of the plain work each stage cannot avoid, on the same model."""
    def inputs(batch, hw):
        shape = (batch, frames, 4, hw[0] // 8, hw[1] // 8)
        cond = Conditioning(torch.randn(batch, 1, 1024, device="cuda"), torch.randn(shape, device="cuda"),
                            torch.tensor([[6.0, 127.0, 0.02]] * batch, device="cuda"))
        return torch.randn(shape, device="cuda"), cond

    x1, c1 = inputs(1, (576, 1024))
    x2, c2 = inputs(2, (576, 1024))
    with torch.no_grad():
        b1 = timed(lambda: backend.denoise(x1, 1.0, c1))
        b2 = timed(lambda: backend.denoise(x2, 1.0, c2))
    xt, ct = inputs(1, train_hw)
    backend.attach_lora(LoraSpec())

    def fwd_bwd():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = backend.denoise(xt, 1.0, ct, lora_scale=1.0)
        out.float().pow(2).mean().backward()

    with backend.lora_training():
        train = timed(fwd_bwd, reps=3)
    backend.detach_lora()
    return {"invert": steps * b1, "train": train_steps * train, "edit": steps * (b2 + b1), "b1": b1, "b2": b2,
            "train_step": train}


def run_video(backend, num_frames: int, settings: PipelineSettings):
    source = synthetic_clip(num_frames, 576, 1024, seed=1)
    edited = source[0].clone()
    edited[:, 100:300, 200:500] = torch.tensor([0.8, 0.2, -0.5]).view(3, 1, 1)
    video = prepare_video(source, settings)
    edits = check_edited_frames(edited[None], video.fit)
    rows = {}
    settings = settings.resolved()
    (inversions, rows["invert"], mem_i) = stage(lambda: invert_video(backend, video, settings))
    (loras, rows["train"], mem_t) = stage(lambda: train_loras(backend, video, settings))
    (result, rows["edit+decode"], mem_e) = stage(lambda: propagate(backend, video, inversions, loras, edits, settings))
    assert result[0].frames.shape == source.shape and bool(torch.isfinite(result[0].frames).all())
    return rows, {"invert": mem_i, "train": mem_t, "edit+decode": mem_e}


def print_table(title, rows, mems, floor, train_scale=1.0):
    print(f"\n## {title}")
    print("| stage | seconds | floor (s) | ratio | peak GiB |")
    print("|---|---|---|---|---|")
    total, total_floor = 0.0, 0.0
    for name, key in (("SARP + inversion (25 steps)", "invert"), ("motion LoRA (250 steps)", "train"),
                      ("matched editing + decode (25 steps)", "edit+decode")):
        seconds = rows[key] * (train_scale if key == "train" else 1.0)
        fl = floor["edit" if key == "edit+decode" else key]
        total, total_floor = total + seconds, total_floor + fl
        print(f"| {name} | {seconds:.1f} | {fl:.1f} | {seconds / fl:.2f} | {mems[key]:.1f} |")
    print(f"| **whole clip** | **{total:.1f}** | **{total_floor:.1f}** | **{total / total_floor:.2f}** | "
          f"{max(mems.values()):.1f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-steps", type=int, default=250)
    parser.add_argument("--skip-interval", action="store_true", help="also time a 2-clip video")
    parser.add_argument("--memory", default="fast", help="memory policy of the one-clip run (i2vedit_core.memory)")
    parser.add_argument("--skip-train-steps", type=int, default=50,
                        help="training steps per clip in the 2-clip run (times scaled to 250 in the table)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs CUDA")
    torch.manual_seed(0)
    backend = full_size_backend()
    settings = PipelineSettings(training=TrainingSettings(steps=args.train_steps), inversion=InversionSettings(),
                                memory=args.memory)
    floor = floors(backend, 14, (512, 896), 25, 250)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, UNet {DTYPE}, latents fp32")
    print(f"floor per call: plain b1 forward {floor['b1'] * 1e3:.0f} ms, plain CFG b2 forward "
          f"{floor['b2'] * 1e3:.0f} ms, LoRA fwd+bwd at 512x896 {floor['train_step'] * 1e3:.0f} ms")
    rows, mems = run_video(backend, 14, settings)
    mode = f"memory={args.memory}"
    print_table(f"one clip, 14 frames, {mode}", rows, mems, floor, 250 / args.train_steps)
    if args.skip_interval:
        skip_settings = PipelineSettings(training=TrainingSettings(steps=args.skip_train_steps), skip_interval=True)
        rows2, mems2 = run_video(backend, 27, skip_settings)
        double = {k: 2 * v for k, v in floor.items()}
        print_table("two clips (27 frames), clip 2 with skip-interval; training scaled to 250 steps/clip",
                    rows2, mems2, double, 250 / args.skip_train_steps)
    print("\nattention written to disk: 0 bytes (source attention is recomputed each step)")


if __name__ == "__main__":
    main()
