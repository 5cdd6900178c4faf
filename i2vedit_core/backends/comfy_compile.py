"""torch.compile of ComfyUI's SVD UNet for motion-LoRA training.

scope "layers" (default): the heavy layers (VideoResBlock, SpatialVideoTransformer) run their class's
compiled forward through the object patches the backend already has on them (`comfy_training.
HeavyLayerForward`, heavy_layers.py): layers of equal shape share a graph, and checkpointing wraps the
compiled layer. The motion LoRA (object-patched Linear forwards reading `LoraState`) is plain Python
that dynamo traces into each layer's graph.

scope "unet": ComfyUI's own whole-model way, `comfy_api.torch_helpers.set_torch_compile_wrapper` (an
APPLY_MODEL wrapper on the backend's clone that swaps `diffusion_model` for its compiled module per
call, as the core TorchCompileModel node does). Kept for the benchmark's A/B (docs/PERFORMANCE.md).

Either way the compile is undone after the block; the MODEL given to the backend never sees it, and a
MODEL that arrives compiled (TorchCompileModel) is left to its own wrapper.
"""

from contextlib import contextmanager

SCOPES = ("layers", "unet")


@contextmanager
def compiled(patcher, switch, backend: str = "inductor", scope: str = "layers"):
    """`patcher`'s UNet compiled with `backend` inside (static shapes: training repeats one shape)."""
    from comfy_api.torch_helpers.torch_compile import TORCH_COMPILE_KWARGS

    if scope not in SCOPES:
        raise ValueError(f"compile scope must be one of {SCOPES}, got {scope!r}")
    if patcher.model_options.get(TORCH_COMPILE_KWARGS) is not None:
        yield  # the MODEL came compiled (TorchCompileModel): its own wrapper already compiles
        return
    if scope == "layers":
        with switch.compiling(heavy_layer_classes(patcher.model.diffusion_model), backend):
            yield
        return
    with whole_unet_compiled(patcher, backend):
        yield


def heavy_layer_classes(diffusion_model) -> set:
    from .comfy_training import HEAVY_LAYERS

    return {type(m) for m in diffusion_model.modules() if type(m).__name__ in HEAVY_LAYERS}


@contextmanager
def whole_unet_compiled(patcher, backend: str):
    import comfy.patcher_extension as ext
    from comfy_api.torch_helpers import set_torch_compile_wrapper
    from comfy_api.torch_helpers.torch_compile import COMPILE_KEY, TORCH_COMPILE_KWARGS

    set_torch_compile_wrapper(patcher, backend=backend, dynamic=False)
    try:
        yield
    finally:
        patcher.remove_wrappers_with_key(ext.WrappersMP.APPLY_MODEL, COMPILE_KEY)
        patcher.model_options.pop(TORCH_COMPILE_KWARGS, None)
