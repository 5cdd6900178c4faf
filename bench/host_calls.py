"""Host work of the ComfyUI training step: Python function calls per step, on the CPU with tiny models.

    python bench/host_calls.py --comfyui /path/to/ComfyUI [--checkpointing 0 3 all]

The ComfyUI step is host-bound on an H200 (docs/PERFORMANCE.md, run 5): the host needs about as long to
queue a step as the GPU needs to run it. The tiny models have SVD's full topology (every module, every
Linear, every checkpointed layer) at small widths, so the Python work per step is the full model's; counting
calls (cProfile) instead of timing makes the figure independent of this machine's load. The reference, from
the same run: the bare-LoRA floor step (`floors.py`), which never checkpoints.
"""

import argparse
import cProfile
import pstats
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import builders  # noqa: E402
import step_profile  # noqa: E402
from i2vedit_core.lora import LoraSpec  # noqa: E402
from i2vedit_core.training import TrainingSettings  # noqa: E402

SIZE = dict(step_profile.TINY, hw=(64, 64), frames=4)
STEPS = 4


def calls_per_step(step) -> int:
    step(), step()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(STEPS):
        step()
    profiler.disable()
    return pstats.Stats(profiler).total_calls // STEPS


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfyui", required=True)
    parser.add_argument("--checkpointing", nargs="+", choices=("0", "3", "all"), default=["0", "3", "all"])
    args = parser.parse_args()
    builders.setup_comfyui(args.comfyui, cpu=True)
    import comfy.model_management as mm

    torch.set_num_threads(1)
    modules = builders.tiny_modules(full_vae=True)
    parts = builders.comfy_parts(modules, **builders.TINY_COMFY)
    backend = builders.comfy_backend(parts)
    z0, cond = step_profile.inputs(backend, SIZE["frames"], SIZE["hw"], SIZE["context"])
    floor = calls_per_step(step_profile.floor_step(parts["model"], SIZE))
    print(f"# Python function calls per ComfyUI training step (tiny SVD topology, CPU, torch {torch.__version__})\n")
    print(f"| step | checkpointed levels | calls | x floor |\n|---|---|---|---|\n| bare-LoRA floor | none | {floor} | 1.00 |")
    mm.load_models_gpu([backend.patcher])
    for setting in args.checkpointing:
        with torch.random.fork_rng(), backend.lora_training({"0": False, "3": 3, "all": True}[setting]):
            calls = calls_per_step(step_profile.pack_step(backend, z0, cond, LoraSpec(), TrainingSettings()))
            backend.detach_lora()
        print(f"| pack | {setting} | {calls} | {calls / floor:.2f} |")
    backend.release()


if __name__ == "__main__":
    main()
