"""ComfyUI entry point of the I2VEdit node pack (V3 node API: `comfy_entrypoint`)."""

import os
import sys

WEB_DIRECTORY = "./js"

# ComfyUI imports this folder as a package. pytest, collecting tests under it, imports this file
# as a plain module when the folder name is not an identifier (e.g. "ComfyUI-I2VEdit"): there is
# then no package to import the nodes from, and nothing to register.
if __package__:
    # The nodes import the host-free core as the top-level `i2vedit_core` (as the CLI and tests do).
    # Appended, not prepended: this folder's `nodes/` must never shadow ComfyUI's own `nodes` module.
    _HERE = os.path.dirname(os.path.abspath(__file__))
    if _HERE not in sys.path:
        sys.path.append(_HERE)

    from .nodes import comfy_entrypoint  # noqa: F401

    __all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
