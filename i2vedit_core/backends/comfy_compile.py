"""torch.compile of ComfyUI's SVD UNet for motion-LoRA training, ComfyUI's own way.

`comfy_api.torch_helpers.set_torch_compile_wrapper` puts an APPLY_MODEL wrapper on the backend's clone
that swaps `diffusion_model` for its compiled module for each call (the core TorchCompileModel node
does the same); `denoise` merges the clone's wrappers into each call's options, so every UNet call
inside the block runs compiled. The motion LoRA (object-patched Linear forwards reading `LoraState`)
and checkpointing (object-patched layer forwards) are plain Python that dynamo traces into the graph.
The wrapper is removed after the block; the MODEL given to the backend never sees it.
"""

from contextlib import contextmanager


@contextmanager
def compiled(patcher, backend: str = "inductor"):
    """`patcher`'s UNet compiled with `backend` inside (static shapes: training repeats one shape)."""
    import comfy.patcher_extension as ext
    from comfy_api.torch_helpers import set_torch_compile_wrapper
    from comfy_api.torch_helpers.torch_compile import COMPILE_KEY, TORCH_COMPILE_KWARGS

    had = patcher.model_options.get(TORCH_COMPILE_KWARGS)
    if had is not None:  # the MODEL came compiled (TorchCompileModel): its own wrapper already compiles
        yield
        return
    set_torch_compile_wrapper(patcher, backend=backend, dynamic=False)
    try:
        yield
    finally:
        patcher.remove_wrappers_with_key(ext.WrappersMP.APPLY_MODEL, COMPILE_KEY)
        patcher.model_options.pop(TORCH_COMPILE_KWARGS, None)
