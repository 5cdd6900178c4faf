"""Motion LoRA on the diffusers UNet (peft adapters on the temporal blocks). Built by the motion-LoRA issue."""

from contextlib import contextmanager


@contextmanager
def use_lora_scale(unet, scale: float):
    # No adapter can be attached yet, so every scale means the base model.
    yield
