"""What gets installed where (issue 15 item 1): requirements.txt is for ComfyUI's shared Python."""

import ast
import re
import tomllib
from pathlib import Path

import pytest

from i2vedit_core.backends import standalone

ROOT = Path(__file__).resolve().parents[1]
IMPORT_NAME = {"opencv-python-headless": "cv2", "pillow": "PIL"}


def requirement_lines(name: str):
    lines = [line.split("#")[0].strip() for line in (ROOT / name).read_text().splitlines()]
    return [line for line in lines if line]


def node_path_imports():
    """Top-level modules imported anywhere the ComfyUI nodes can reach (the pack minus the diffusers backend)."""
    files = [ROOT / "__init__.py", *(ROOT / "nodes").rglob("*.py"), *(ROOT / "i2vedit_core").rglob("*.py")]
    roots = set()
    for path in files:
        if path.name.startswith("diffusers") or path.name in ("tiny.py", "cli.py", "__main__.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                roots.add(node.module.split(".")[0])
    return roots


def test_requirements_txt_has_lower_bounds_only_and_only_what_the_nodes_import():
    lines = requirement_lines("requirements.txt")
    assert lines, "requirements.txt is empty"
    imported = node_path_imports()
    for line in lines:
        name, bound = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", line).groups()  # no ==, ~=, <, extras
        assert IMPORT_NAME.get(name.lower(), name) in imported, f"{name} is listed but the node path never imports it"
    standalone_names = {re.split(r"[<>=~!]", line)[0].lower() for line in requirement_lines("requirements-standalone.txt")}
    assert not {"diffusers", "peft", "transformers", "accelerate", "einops"} & {l.split(">=")[0] for l in lines}
    assert {"diffusers", "peft", "transformers", "accelerate"} <= standalone_names
    assert "einops" not in imported | standalone_names  # imported nowhere, listed nowhere


def test_pyproject_lists_the_same_sets():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["dependencies"] == requirement_lines("requirements.txt")
    standalone_lines = requirement_lines("requirements-standalone.txt")
    assert standalone_lines[0] == "-r requirements.txt"
    assert project["optional-dependencies"]["standalone"] == standalone_lines[1:]
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]+>=[0-9.]+", line) for line in standalone_lines[1:])


def test_standalone_minimums_are_the_listed_lower_bounds():
    listed = dict(line.split(">=") for line in requirement_lines("requirements-standalone.txt")[1:])
    assert {name: listed[name] for name in standalone.MINIMUM} == standalone.MINIMUM


def test_diffusers_backend_names_the_version_it_needs():
    versions = {"diffusers": "0.30.0", "peft": "0.21.2", "transformers": "5.30.1.dev0"}

    def version(name):
        if name not in versions:
            raise standalone.metadata.PackageNotFoundError(name)
        return versions[name]

    assert standalone.release("5.30.1.dev0") == (5, 30, 1) and standalone.release("0.42.1") > standalone.release("0.9.9")
    with pytest.raises(ImportError, match=r"diffusers>=0\.42\.1 \(found 0\.30\.0\): pip install -r "
                                          r"requirements-standalone\.txt") as error:
        standalone.check_versions(version=version)
    assert "peft" not in str(error.value) and "transformers" not in str(error.value)
    versions.pop("peft")
    assert standalone.missing_or_old(version=version) == ["diffusers>=0.42.1 (found 0.30.0)",
                                                           "peft>=0.21.2 (not installed)"]
    versions.update(diffusers="0.42.1", peft="1.0")
    standalone.check_versions(version=version)  # new enough: no error
