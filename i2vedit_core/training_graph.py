"""The motion-LoRA training step captured once as a CUDA graph and replayed for the remaining steps.

Training repeats one step 250 times on one shape, and on ComfyUI's SVD the host needs about as long to queue a
step's ~10^4 kernels as the GPU needs to run them, longer with checkpointing (docs/PERFORMANCE.md, run 5).
Replaying a captured graph queues the whole step in one call. What capture needs, and where it is provided:
- the step's inputs in static device buffers, refilled before each replay: the noise, the noisy conditioning
  latent, sigma and its EDM weight (`CapturedStep`; `training.step_on` takes sigma and the weight as tensors);
- nothing random drawn on the host inside the step: the fused LoRA dropout keys on a seed drawn on the device
  (branch_dropout.DropoutSeed; torch replays device RNG draws with fresh offsets), and checkpointing saves and
  restores no RNG state while a graph is captured (recompute.py);
- AdamW with capturable=True (its step count lives on the device);
- no host-side work in the backend's denoise that changes between steps (`capturable_training` on the
  backend says when that holds; ComfyUI's model loading is skipped while capturing).
The first steps run eagerly on the side stream the capture uses (lazy initialisation: AdamW's state, library
workspaces, a torch.compile of the UNet), then one step is captured (capturing runs nothing) and replayed from
then on: the same inputs and, with the device RNG replayed at the generator's offsets, the same dropout masks as
eager steps would draw. If capturing fails, training warns and goes on eagerly from the same step.
"""

import warnings
from typing import Callable, Optional

import torch

from .backends.base import Conditioning

WARMUP_STEPS = 2


def graph_applies(setting: bool, backend, device: torch.device, gradient_checkpointing, skip_interval: bool,
                  compile_with: Optional[str]) -> bool:
    """Whether training replays a captured step: asked for, on CUDA, the backend can be captured with this
    checkpointing, no skip-interval (its clip-0 latent is chosen on the host from sigma). A compiled step is
    captured too (the first warm-up step compiles it), but not with checkpointing: compiled code draws its
    dropout with inductor's own RNG, not the fused kernel's call seed, and a recomputation inside a graph could
    not restore the RNG state to draw the same masks again."""
    if not setting or device.type != "cuda" or skip_interval:
        return False
    if compile_with is not None and gradient_checkpointing:
        return False
    capturable = getattr(backend, "capturable_training", None)
    return bool(capturable is not None and capturable(gradient_checkpointing))


def is_capturing() -> bool:
    """True while a CUDA graph is being captured on the current stream."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class CapturedStep:
    """`body(noise, cond, sigma, weight) -> loss` (training.step_on with the rest bound) on static inputs:
    `warmup_steps` eager calls, then one capture, then replays (off CUDA: always eager). Call it with each step's
    inputs; it returns the step's loss, a device tensor not read."""

    def __init__(self, body: Callable, z0: torch.Tensor, cond: Conditioning, optimizer: torch.optim.Optimizer,
                 warmup_steps: int = WARMUP_STEPS):
        self.body, self.optimizer, self.warmup_left = body, optimizer, warmup_steps
        device = z0.device
        self.noise = torch.zeros_like(z0)
        self.cond = Conditioning(cond.image_embeds, torch.zeros_like(cond.image_latents), cond.time_ids)
        # sigma in float64, as an eager step's Python float: the preconditioning computed from it rounds to float32
        # where it meets the latents, as the eager one does, so replayed and eager steps compute the same numbers
        # (a float32 sigma made them drift apart by 1e-3 over 6 steps of the tiny UNet). The weight only multiplies
        # the float32 loss, which rounds a Python float to float32 too.
        self.sigma = torch.ones((), dtype=torch.float64, device=device)
        self.weight = torch.ones((), dtype=torch.float32, device=device)
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.loss: Optional[torch.Tensor] = None
        self.eager = False  # capturing failed: every later step runs eagerly

    def __call__(self, noise: torch.Tensor, cond: Conditioning, sigma: float, weight: float) -> torch.Tensor:
        self.noise.copy_(noise)
        self.cond.image_latents.copy_(cond.image_latents)
        self.sigma.fill_(sigma)
        self.weight.fill_(weight)
        if self.graph is None and not self.eager and self.warmup_left <= 0 and self.stream is not None:
            self._capture()
        if self.graph is not None:
            self.graph.replay()
            return self.loss.clone()  # the next replay overwrites the static loss before it is read
        self.warmup_left -= 1
        with warnings.catch_warnings():  # AdamW(capturable=True) warns when stepped uncaptured, as warm-up is
            warnings.filterwarnings("ignore", message="This instance was constructed with capturable=True")
            return self._on_side_stream(self._run)

    def release(self) -> None:
        """Free the graph's memory pool and the static buffers' hold on it."""
        if self.graph is not None:
            self.graph.reset()
        self.graph = self.loss = None

    def _run(self) -> torch.Tensor:
        return self.body(self.noise, self.cond, self.sigma, self.weight)

    def _on_side_stream(self, run):
        if self.stream is None:
            return run()
        current = torch.cuda.current_stream(self.stream.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            out = run()
        current.wait_stream(self.stream)
        return out

    def _capture(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)  # backward inside the graph allocates them from its pool
        graph = torch.cuda.CUDAGraph()
        generator = torch.cuda.default_generators[self.stream.device.index]
        before = generator.clone_state()
        try:
            with torch.cuda.graph(graph, stream=self.stream):
                loss = self._run()
        except Exception as error:  # noqa: BLE001  any failure to capture: the step is only slower eagerly
            # A capture that fails midway leaves the device's generator marked as capturing, and every later
            # random draw on the device would then fail: put back its state from before the capture.
            generator.graphsafe_set_state(before)
            self.eager = True
            self.optimizer.zero_grad(set_to_none=True)
            warnings.warn(f"the training step could not be captured as a CUDA graph, so it runs eagerly (slower, "
                          f"same result): {type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}. "
                          f"TrainingSettings(cuda_graph=False) (the CLI's --no-cuda-graph) skips the attempt.",
                          stacklevel=3)
            return
        self.graph, self.loss = graph, loss
