"""Host tier: tests against a real ComfyUI work tree named by COMFYUI_PATH (README "Host and browser test tiers").

Without COMFYUI_PATH (CI, the core tier) every test here is skipped with that reason shown.
With it, ComfyUI is put on sys.path in CPU mode as COMFYUI_NOTES 7.2 says: `args.cpu` must be set
before `comfy.model_management` is first imported, or a CUDA-less torch fails at import.

Attention runs on PyTorch SDPA (`--use-pytorch-cross-attention`, ComfyUI's default on GPUs). On CPU
ComfyUI would otherwise pick its sub-quadratic attention, whose chunked softmax alone moves D by up
to 3.4e-4 relative on the tiny model (measured against a float64 reference; SDPA: 1.1e-5, diffusers
fp32: 3e-6), which would leave the 1e-3 parity bound almost no margin.
"""

import os
import sys
from pathlib import Path

import pytest

HOST_DIR = Path(__file__).parent
SKIP_REASON = ("host tier: COMFYUI_PATH is not set (point it at a ComfyUI work tree to run these; "
               "see README 'Host and browser test tiers')")


def comfyui_path():
    value = os.environ.get("COMFYUI_PATH")
    return Path(value).resolve() if value else None


def _setup_comfyui(root: Path) -> None:
    if not (root / "comfy" / "model_patcher.py").is_file():
        raise pytest.UsageError(f"COMFYUI_PATH={root} is not a ComfyUI work tree (no comfy/model_patcher.py)")
    # Ahead of the repository root: ComfyUI's `nodes.py` must win over this pack's `nodes/` package.
    sys.path.insert(0, str(root))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    comfy.cli_args.args.use_pytorch_cross_attention = True


def pytest_configure(config):
    root = comfyui_path()
    if root is not None:
        _setup_comfyui(root)


def pytest_collection_modifyitems(config, items):
    if comfyui_path() is not None:
        return
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if HOST_DIR in Path(str(item.fspath)).parents:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def comfyui_nodes_module_first(comfyui_root):
    """ComfyUI's `nodes` module, not this pack's `nodes/`, for every host test, also when the core tier runs in the
    same session: importing bench/ (tests/test_bench.py) puts the repository root first on sys.path, where the
    pack's `nodes/` would shadow ComfyUI's `nodes.py` for the first `import nodes` after collection."""
    if comfyui_root is None:
        yield
        return
    if str(comfyui_root) in sys.path:
        sys.path.remove(str(comfyui_root))
    sys.path.insert(0, str(comfyui_root))
    loaded = sys.modules.get("nodes")
    if loaded is not None and Path(getattr(loaded, "__file__", "") or "").resolve().parent != comfyui_root:
        del sys.modules["nodes"]
    yield


@pytest.fixture(scope="session")
def comfyui_root():
    return comfyui_path()


@pytest.fixture(scope="session")
def tiny_weights():
    """Seeded diffusers/transformers modules: the reference weights both backends share."""
    import torch

    from tiny_comfy import diffusers_unet, diffusers_vae, transformers_clip

    torch.set_num_threads(min(2, torch.get_num_threads()))
    return dict(unet=diffusers_unet(), vae=diffusers_vae(), clip=transformers_clip())


@pytest.fixture(scope="session")
def comfy_parts(tiny_weights, tmp_path_factory):
    """MODEL, CLIP_VISION, VAE built from ComfyUI's classes with the shared weights."""
    from tiny_comfy import comfy_clip_vision, comfy_model, comfy_vae

    folder = tmp_path_factory.mktemp("comfy_tiny")
    return dict(model=comfy_model(tiny_weights["unet"]), clip_vision=comfy_clip_vision(tiny_weights["clip"], folder),
                vae=comfy_vae(tiny_weights["vae"]))


@pytest.fixture(scope="session")
def diffusers_backend(tiny_weights):
    from i2vedit_core.backends.diffusers import DiffusersBackend

    return DiffusersBackend(tiny_weights["unet"], tiny_weights["vae"], tiny_weights["clip"], "cpu")


@pytest.fixture()
def comfy_backend(comfy_parts):
    from i2vedit_core.backends.comfy import ComfyBackend

    backend = ComfyBackend(comfy_parts["model"], comfy_parts["clip_vision"], comfy_parts["vae"])
    yield backend
    backend.release()
