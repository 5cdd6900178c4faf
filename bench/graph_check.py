"""Whether the training step of the tiny models captures as a CUDA graph on this GPU, and if not, where it fails.

    python bench/graph_check.py [--comfyui PATH]

Trains a few steps of the CI's tiny diffusers model (and, with --comfyui, ComfyUI's tiny SVD) on CUDA with the
graph on and off, and prints the losses of both, how many steps were replayed, and the traceback of a failed
capture (training itself then goes on eagerly with a warning, training_graph.py).

`--spread`: how far apart the LoRA weights of the same 6 SGD steps end (tiny diffusers model, fp32 and bf16):
eager against eager run again, and replayed against eager, per adapted tensor as a fraction of its largest value
(what tests/test_training_graph.py's tolerance rests on).
"""

import argparse
import dataclasses
import sys
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from i2vedit_core import training_graph  # noqa: E402
from i2vedit_core.lora import LoraSpec  # noqa: E402
from i2vedit_core.tiny import synthetic_clip, tiny_backend  # noqa: E402
from i2vedit_core.training import TrainingSettings, train_motion_lora  # noqa: E402


def traced(run):
    def run_and_report(self):
        try:
            return run(self)
        except Exception:
            if torch.cuda.is_current_stream_capturing():
                traceback.print_exc()
            raise
    return run_and_report


def check(name, backend, checkpointing):
    frames = synthetic_clip(num_frames=3, height=64, width=64, seed=2)
    settings = TrainingSettings(steps=5, learning_rate=1e-2, seed=5, gradient_checkpointing=checkpointing,
                                lora=LoraSpec(rank=4, dropout=0.1))
    replays = []
    original = torch.cuda.CUDAGraph.replay
    torch.cuda.CUDAGraph.replay = lambda graph: (replays.append(1), original(graph))[1]
    try:
        eager = train_motion_lora(backend, frames, dataclasses.replace(settings, cuda_graph=False))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            graphed = train_motion_lora(backend, frames, settings)
    finally:
        torch.cuda.CUDAGraph.replay = original
    backend.detach_lora()
    print(f"{name}, checkpointing {checkpointing}: replayed {len(replays)} of {settings.steps} steps; losses eager "
          f"{[round(v, 6) for v in eager.losses]}, graph {[round(v, 6) for v in graphed.losses]}; warnings: "
          f"{[str(w.message)[:300] for w in caught]}", flush=True)


def spread():
    real_adamw = torch.optim.AdamW
    torch.optim.AdamW = lambda params, lr, **_: torch.optim.SGD(params, lr=lr)  # updates = gradients (test's SGD)
    try:
        backend = tiny_backend(seed=0, device="cuda")
        frames = synthetic_clip(num_frames=3, height=64, width=64, seed=2)
        for mixed_precision in (False, True):
            for checkpointing in (False, True):
                settings = TrainingSettings(steps=6, learning_rate=1e-2, seed=5, mixed_precision=mixed_precision,
                                            gradient_checkpointing=checkpointing, lora=LoraSpec(rank=4, dropout=0.1))
                runs = [train_motion_lora(backend, frames, dataclasses.replace(settings, cuda_graph=graph)).lora
                        for graph in (False, False, True)]
                worst = {}
                for label, other in (("eager again", runs[1]), ("replayed", runs[2])):
                    worst[label] = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
                                       for path in runs[0].module_paths
                                       for a, b in zip(other.pair(path), runs[0].pair(path)))
                print(f"spread, {'bf16' if mixed_precision else 'fp32'}, checkpointing {checkpointing}: largest LoRA "
                      f"weight difference / the tensor's largest value: eager again {worst['eager again']:.2e}, "
                      f"replayed {worst['replayed']:.2e}", flush=True)
        backend.detach_lora()
    finally:
        torch.optim.AdamW = real_adamw


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfyui", default=None)
    parser.add_argument("--spread", action="store_true", help="also eager vs eager vs replayed LoRA weights")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs CUDA")
    training_graph.CapturedStep._run = traced(training_graph.CapturedStep._run)
    for checkpointing in (False, True):
        check("diffusers", tiny_backend(seed=0, device="cuda"), checkpointing)
    if args.spread:
        spread()
    if args.comfyui:
        import builders
        builders.setup_comfyui(args.comfyui)
        parts = builders.comfy_parts(builders.tiny_modules(full_vae=True), **builders.TINY_COMFY)
        backend = builders.comfy_backend(parts)
        for checkpointing in (False, True):
            check("comfy", backend, checkpointing)
        backend.release()


if __name__ == "__main__":
    main()
