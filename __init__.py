"""ComfyUI entry point of the I2VEdit node pack (V3 node API: `comfy_entrypoint`)."""

from .nodes import comfy_entrypoint

WEB_DIRECTORY = "./js"

__all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
