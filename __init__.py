"""ComfyUI entry point of the I2VEdit node pack (V3 node API: `comfy_entrypoint`)."""

WEB_DIRECTORY = "./js"

# ComfyUI imports this folder as a package. pytest, collecting tests under it, imports this file
# as a plain module when the folder name is not an identifier (e.g. "ComfyUI-I2VEdit"): there is
# then no package to import the nodes from, and nothing to register.
if __package__:
    from .nodes import comfy_entrypoint  # noqa: F401

    __all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
