"""I2VEdit core: first-frame-guided video editing on Stable Video Diffusion, host-free.

Nothing here imports ComfyUI; `backends.comfy` is the only module that may.
"""

__version__ = "0.1.0"
