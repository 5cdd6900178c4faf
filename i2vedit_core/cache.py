"""Cache of per-clip artifacts (inversion latents, motion LoRAs) keyed by what produced them.

A second edit of the same video with the same settings and model skips inversion and training.
Entries live in memory and, optionally, in a folder as safetensors written atomically, so a
cancelled or crashed run never leaves a partial entry behind.
"""

import dataclasses
import hashlib
import json
import os
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
from safetensors.torch import load_file, save_file

from .files import publish, temp_beside

Entry = Tuple[Dict[str, torch.Tensor], Dict[str, str]]


def fingerprint(*parts) -> str:
    """A hex digest of tensors (values, shape, dtype), dataclasses, and JSON-able values."""
    digest = hashlib.sha256()
    for part in parts:
        _feed(digest, part)
    return digest.hexdigest()[:32]


def _feed(digest, part) -> None:
    if isinstance(part, torch.Tensor):
        tensor = part.detach().cpu().contiguous()
        digest.update(f"tensor{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    elif dataclasses.is_dataclass(part) and not isinstance(part, type):
        digest.update(type(part).__name__.encode())
        _feed(digest, dataclasses.asdict(part))
    elif isinstance(part, (list, tuple)):
        digest.update(b"[")
        for item in part:
            _feed(digest, item)
        digest.update(b"]")
    elif isinstance(part, dict):
        digest.update(b"{")
        for key in sorted(part, key=str):
            _feed(digest, str(key))
            _feed(digest, part[key])
        digest.update(b"}")
    else:
        digest.update(json.dumps(part, sort_keys=True, default=str).encode())


class ArtifactCache:
    """In-memory LRU of tensor dicts with an optional safetensors folder behind it."""

    def __init__(self, folder: Optional[os.PathLike] = None, max_in_memory: int = 16):
        self.folder = Path(folder) if folder is not None else None
        self.max_in_memory = max_in_memory
        self._memory: "OrderedDict[str, Entry]" = OrderedDict()
        if self.folder is not None:
            _check_writable(self.folder)

    def get(self, key: str) -> Optional[Entry]:
        if key in self._memory:
            self._memory.move_to_end(key)
            return self._memory[key]
        path = self._path(key)
        if path is None or not path.is_file():
            return None
        entry = (load_file(path), _read_metadata(path))
        self._remember(key, entry)
        return entry

    def put(self, key: str, tensors: Dict[str, torch.Tensor], metadata: Optional[Dict[str, str]] = None) -> None:
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        metadata = {k: str(v) for k, v in (metadata or {}).items()}
        path = self._path(key)
        if path is not None:
            _write_atomically(path, tensors, metadata)
        self._remember(key, (tensors, metadata))

    def __contains__(self, key: str) -> bool:
        path = self._path(key)
        return key in self._memory or (path is not None and path.is_file())

    def _remember(self, key: str, entry: Entry) -> None:
        self._memory[key] = entry
        self._memory.move_to_end(key)
        while len(self._memory) > self.max_in_memory:
            self._memory.popitem(last=False)

    def _path(self, key: str) -> Optional[Path]:
        return None if self.folder is None else self.folder / f"{key}.safetensors"


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise ValueError(f"cache folder {folder} is not writable ({err.strerror}); "
                         "choose another folder or run without a cache folder") from err


def _write_atomically(path: Path, tensors: Dict[str, torch.Tensor], metadata: Dict[str, str]) -> None:
    tmp = temp_beside(path)  # mode from the user's umask (mkstemp would give 0600)
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        publish(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise ValueError(f"could not write the cache entry {path} ({err.strerror}); "
                         "free disk space or choose another cache folder") from err
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_metadata(path: Path) -> Dict[str, str]:
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})
