"""Attention control on the diffusers UNet (the 32 attn1 modules). Built by the attention-matching issue."""

from contextlib import contextmanager


@contextmanager
def use_attention(unet, attention):
    if attention is not None:
        raise NotImplementedError("attention matching is not yet available in the diffusers backend")
    yield
