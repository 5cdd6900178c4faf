"""Load this repository as ComfyUI loads a custom-node pack (a package named after its folder).

The pack's `nodes/` cannot be imported as a top-level `nodes` here: ComfyUI's own `nodes` module
owns that name (conftest puts ComfyUI first on sys.path), as it does inside ComfyUI.
"""

import importlib
import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = "i2vedit_pack"


def load_pack():
    if PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACKAGE, REPO / "__init__.py",
                                                      submodule_search_locations=[str(REPO)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = module
        spec.loader.exec_module(module)
    return sys.modules[PACKAGE]


def node_module(name: str):
    load_pack()
    return importlib.import_module(f"{PACKAGE}.nodes.{name}")


def node_classes():
    load_pack()
    return importlib.import_module(f"{PACKAGE}.nodes").node_classes()
