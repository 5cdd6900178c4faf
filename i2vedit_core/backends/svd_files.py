"""Checks of an SVD model path that read only small files (configs, the safetensors header), so a
wrong --svd is reported with every other bad input before the (minutes-long) load starts."""

import json
import struct
from pathlib import Path
from typing import List

SUBFOLDERS = ("unet", "vae", "image_encoder")  # diffusers layout of stabilityai/stable-video-diffusion-img2vid
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
MAX_HEADER = 100 * 2 ** 20


def svd_path_problems(path) -> List[str]:
    """Why `path` cannot be an SVD model for load_svd, naming the file at fault; [] when it may be."""
    path = Path(path)
    if not path.exists():
        return [f"{path} does not exist: give a diffusers SVD folder or an SVD .safetensors file"]
    if path.is_dir():
        return [p for sub in SUBFOLDERS for p in _config_problems(path, sub)]
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return [f"{path} is a pickle checkpoint, which is refused (loading it could run code): convert it to "
                ".safetensors first"]
    return _header_problems(path)


def _config_problems(folder: Path, sub: str) -> List[str]:
    config = folder / sub / "config.json"
    if not config.is_file():
        return [f"{folder} is not a diffusers SVD folder: {sub}/config.json is missing (expected the layout of "
                "stabilityai/stable-video-diffusion-img2vid)"]
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        return [f"{config} is not valid JSON ({err}): repair that file or download the model folder again"]
    return []


def _header_problems(path: Path) -> List[str]:
    """A safetensors file starts with an 8-byte little-endian header length and that much JSON."""
    try:
        with open(path, "rb") as file:
            head = file.read(8)
            size = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < size <= min(MAX_HEADER, path.stat().st_size - 8):
                raise ValueError("no safetensors header")
            json.loads(file.read(size))
    except (ValueError, UnicodeDecodeError) as err:
        return [f"{path} is not a readable .safetensors file ({err}; corrupt, truncated or another format): "
                "download it again or give the diffusers folder"]
    except OSError as err:
        return [f"{path} cannot be read ({err.strerror})"]
    return []
