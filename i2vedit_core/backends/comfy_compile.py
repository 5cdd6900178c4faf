"""torch.compile of ComfyUI's SVD UNet for motion-LoRA training, ComfyUI's own way.

`comfy_api.torch_helpers.set_torch_compile_wrapper` puts an APPLY_MODEL wrapper on the backend's clone
that swaps `diffusion_model` for its compiled module for each call (the core TorchCompileModel node
does the same); `denoise` merges the clone's wrappers into each call's options, so every UNet call
inside the block runs compiled. The motion LoRA (object-patched Linear forwards reading `LoraState`)
and checkpointing (object-patched layer forwards) are plain Python that dynamo traces into the graph;
the call's LoRA scale is pinned on the state by a second APPLY_MODEL wrapper, outside the compiled
module, because torch <= 2.13 cannot trace the ContextVar that carries it otherwise (comfy_lora).
Both wrappers are removed after the block; the MODEL given to the backend never sees them.
"""

from contextlib import contextmanager

from . import comfy_lora


PIN_KEY = "i2vedit_lora_pin"


@contextmanager
def compiled(patcher, lora_state, backend: str = "inductor"):
    """`patcher`'s UNet compiled with `backend` inside (static shapes: training repeats one shape), with
    each call's LoRA (scale, slot) pinned on `lora_state` outside the compiled module (comfy_lora)."""
    import comfy.patcher_extension as ext
    from comfy_api.torch_helpers import set_torch_compile_wrapper
    from comfy_api.torch_helpers.torch_compile import COMPILE_KEY, TORCH_COMPILE_KWARGS

    patcher.add_wrapper_with_key(ext.WrappersMP.APPLY_MODEL, PIN_KEY, comfy_lora.pin_lora_call(lora_state))
    try:
        if patcher.model_options.get(TORCH_COMPILE_KWARGS) is not None:
            yield  # the MODEL came compiled (TorchCompileModel): its own wrapper already compiles
            return
        set_torch_compile_wrapper(patcher, backend=backend, dynamic=False)
        try:
            yield
        finally:
            patcher.remove_wrappers_with_key(ext.WrappersMP.APPLY_MODEL, COMPILE_KEY)
            patcher.model_options.pop(TORCH_COMPILE_KWARGS, None)
    finally:
        patcher.remove_wrappers_with_key(ext.WrappersMP.APPLY_MODEL, PIN_KEY)
