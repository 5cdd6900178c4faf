"""torch.compile of ComfyUI's SVD UNet for motion-LoRA training, per heavy layer (heavy_layers.py).

The heavy layers (VideoResBlock, SpatialVideoTransformer) run their class's compiled forward through
the object patches the backend already has on them (`comfy_training.HeavyLayerForward`); checkpointing
wraps the compiled layer from outside. The motion LoRA (object-patched Linear forwards reading
`LoraState`) is plain Python that dynamo traces into each layer's graph.

Not ComfyUI's whole-model `set_torch_compile_wrapper` (what the core TorchCompileModel node does): one
graph of the whole UNet's forward and backward took 245 s to compile on an H200, and the 24gb/12gb
tiers' checkpointing split it at every recomputed layer (docs/PERFORMANCE.md). The compile is undone
after the block; the MODEL given to the backend never sees it, and a MODEL that arrives compiled
(TorchCompileModel) is left to its own wrapper.
"""

from contextlib import contextmanager


@contextmanager
def compiled(patcher, switch, backend: str = "inductor"):
    """`patcher`'s heavy layers compiled with `backend` inside (static shapes: training repeats one shape)."""
    from comfy_api.torch_helpers.torch_compile import TORCH_COMPILE_KWARGS

    if patcher.model_options.get(TORCH_COMPILE_KWARGS) is not None:
        yield  # the MODEL came compiled (TorchCompileModel): its own wrapper already compiles
        return
    with switch.compiling(heavy_layer_classes(patcher.model.diffusion_model), backend):
        yield


def heavy_layer_classes(diffusion_model) -> set:
    from .comfy_training import HEAVY_LAYERS

    return {type(m) for m in diffusion_model.modules() if type(m).__name__ in HEAVY_LAYERS}
