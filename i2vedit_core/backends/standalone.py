"""The standalone stack the diffusers backend runs on (requirements-standalone.txt), checked at import.

Inside ComfyUI the nodes never import it; the command line, the Python API and the tests do. The
minimums are the versions whose internals the diffusers backend was written and tested against
(attention processor names, peft's injection, the SVD model classes; DIFFUSERS_NOTES).
"""

import re
from importlib import metadata
from typing import Callable, Dict, Tuple

MINIMUM: Dict[str, str] = {"diffusers": "0.42.1", "peft": "0.21.2", "transformers": "5.23.0"}
FIX = "pip install -r requirements-standalone.txt (or pip install 'i2vedit[standalone]')"


def release(version: str) -> Tuple[int, ...]:
    """The numeric release part of a version string: '0.42.1.dev0' -> (0, 42, 1)."""
    match = re.match(r"\d+(\.\d+)*", version)
    return tuple(int(part) for part in match.group(0).split(".")) if match else ()


def missing_or_old(minimum: Dict[str, str] = MINIMUM, version: Callable[[str], str] = metadata.version) -> list:
    """'name>=min (found x)' for every package below its minimum or absent."""
    problems = []
    for name, least in minimum.items():
        try:
            found = version(name)
        except metadata.PackageNotFoundError:
            problems.append(f"{name}>={least} (not installed)")
            continue
        if release(found) < release(least):
            problems.append(f"{name}>={least} (found {found})")
    return problems


def check_versions(minimum: Dict[str, str] = MINIMUM, version: Callable[[str], str] = metadata.version) -> None:
    problems = missing_or_old(minimum, version)
    if problems:
        raise ImportError(f"i2vedit's diffusers backend (command line, Python API, tests) needs "
                          f"{', '.join(problems)}: {FIX}. The ComfyUI nodes do not need these packages.")
