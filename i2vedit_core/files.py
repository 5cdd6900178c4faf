"""Writing files safely: staged beside their target, renamed into place only when all are complete.

Used by the CLI's outputs, the cache and the motion-LoRA saver. A failed or cancelled write leaves
no partial file; a staged file is created with mode 0o666 minus the user's umask, as `open()` would
(tempfile.mkstemp would give 0600, which other users and tools sharing the folder cannot read).
"""

import os
import uuid
from pathlib import Path
from typing import List, Tuple


def temp_beside(path: os.PathLike) -> Path:
    """A new empty hidden file next to `path`, with the same suffix (writers pick the format from it)."""
    path = Path(path)
    while True:
        temp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.partial{path.suffix}")
        try:
            os.close(os.open(temp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return temp
        except FileExistsError:  # a name drawn twice: draw again
            continue


def publish(temp: Path, target: Path) -> None:
    """Rename a finished file into place with mode 0o666 minus the umask (some writers, safetensors among
    them, create their file 0600 whatever the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temp, 0o666 & ~umask)
    os.replace(temp, target)


class StagedFiles:
    """Files written to temporary names, then all renamed into place by `commit()`.

    As a context manager: an exception (or Ctrl-C) inside the block removes every staged file and
    leaves the targets as they were.
    """

    def __init__(self, overwrite: bool = True):
        self.overwrite = overwrite
        self.staged: List[Tuple[Path, Path]] = []

    def stage(self, target: os.PathLike) -> Path:
        """The temporary path to write `target`'s content to (its folder is created)."""
        target = Path(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = temp_beside(target)
        self.staged.append((temp, target))
        return temp

    def commit(self) -> List[Path]:
        if not self.overwrite:
            existing = [str(target) for _, target in self.staged if target.exists()]
            if existing:  # appeared since the run was checked
                raise FileExistsError(f"{', '.join(existing)} already exist(s); nothing was replaced")
        for temp, target in self.staged:
            publish(temp, target)
        targets = [target for _, target in self.staged]
        self.staged = []
        return targets

    def discard(self) -> None:
        for temp, _ in self.staged:
            temp.unlink(missing_ok=True)
        self.staged = []

    def __enter__(self) -> "StagedFiles":
        return self

    def __exit__(self, kind, error, trace) -> None:
        self.discard()  # after a commit nothing is left to discard


def writable_place(path: os.PathLike) -> str:
    """'' if a file or folder could be created at `path`, else why not. Creates nothing that stays."""
    path = Path(path).absolute()
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    try:
        temp_beside(existing / "probe").unlink()
    except OSError as error:
        return f"{existing} is not writable ({error.strerror})"
    return ""
