import ast
import subprocess
import sys
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[1] / "i2vedit_core"
HOST_MODULES = {"comfy", "comfy_api", "comfy_extras", "folder_paths", "nodes", "server", "execution"}


def imported_roots(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0]


def test_core_imports_no_comfyui_outside_its_backend():
    offenders = {str(p.relative_to(CORE)): sorted(set(imported_roots(p)) & HOST_MODULES)
                 for p in CORE.rglob("*.py") if not p.name.startswith("comfy")}
    assert {k: v for k, v in offenders.items() if v} == {}


NO_NETWORK = """
import socket
def refuse(*args, **kwargs):
    raise OSError("network access attempted")
socket.socket.connect = refuse
socket.socket.connect_ex = refuse
socket.create_connection = refuse
socket.getaddrinfo = refuse
import importlib, pkgutil, i2vedit_core
for module in pkgutil.walk_packages(i2vedit_core.__path__, "i2vedit_core."):
    if not module.name.startswith("i2vedit_core.backends.comfy") and module.name != "i2vedit_core.__main__":
        importlib.import_module(module.name)
from i2vedit_core.tiny import tiny_backend, synthetic_clip
from i2vedit_core.inversion import InversionSettings, invert_clip
inversion = invert_clip(tiny_backend(), synthetic_clip(3), InversionSettings(steps=2))
print("ok", tuple(inversion.latents.shape))
"""


def test_import_and_run_without_network(tmp_path):
    from i2vedit_core.backends.standalone import FIX, missing_or_old
    if missing_or_old():
        pytest.skip(f"needs the standalone set ({', '.join(missing_or_old())}): {FIX}")
    env = {"PATH": "", "HOME": str(tmp_path), "PYTHONPATH": str(CORE.parent)}  # no HF_HUB_OFFLINE on purpose
    result = subprocess.run([sys.executable, "-c", NO_NETWORK], capture_output=True, text=True, env=env,
                            timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ok (3, 1, 3, 4, 8, 8)" in result.stdout


def test_pack_imports_as_a_package_under_a_non_identifier_folder_name(tmp_path):
    import importlib.util
    import shutil
    pack = tmp_path / "ComfyUI-I2VEdit"
    shutil.copytree(CORE.parent / "nodes", pack / "nodes")
    shutil.copy(CORE.parent / "__init__.py", pack / "__init__.py")
    spec = importlib.util.spec_from_file_location("ComfyUI-I2VEdit", pack / "__init__.py",
                                                  submodule_search_locations=[str(pack)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)  # what ComfyUI's load_custom_node does
    finally:
        sys.modules.pop(spec.name, None)
        sys.modules.pop("ComfyUI-I2VEdit.nodes", None)
    assert module.WEB_DIRECTORY == "./js"
    assert callable(module.comfy_entrypoint)
