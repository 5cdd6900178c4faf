"""Pack conventions a ComfyUI user and the Comfy registry rely on (no ComfyUI needed).

Registry metadata in pyproject.toml, example workflows where the template browser looks for them
(example_workflows/<name>.json with <name>.jpg beside it), numbered so that they sort.
"""

import json
import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((REPO / "example_workflows").glob("*.json"))


def test_registry_metadata_is_complete():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    comfy = project["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"] and comfy["requires-comfyui"].startswith(">=")
    assert "Icon" not in comfy or re.match(r"https://\S+\.(svg|png|jpg|gif)$", comfy["Icon"])
    classifiers = project["project"]["classifiers"]
    assert any(c.startswith("Operating System :: ") for c in classifiers)
    assert any(c.startswith("Environment :: GPU :: ") for c in classifiers)
    licence = next(c for c in classifiers if c.startswith("License :: "))
    assert "GPLv3" in licence and "GNU GENERAL PUBLIC LICENSE" in (REPO / "LICENSE").read_text()[:200]
    assert project["project"]["urls"]["Repository"].startswith("https://github.com/")


def test_example_workflows_are_numbered_and_have_thumbnails():
    assert WORKFLOWS and not (REPO / "workflows").exists()
    numbers = [int(p.stem[:2]) for p in WORKFLOWS]
    assert numbers == list(range(1, len(WORKFLOWS) + 1))
    for path in WORKFLOWS:
        assert re.fullmatch(r"\d\d_[a-z0-9_]+", path.stem)
        thumbnail = path.with_suffix(".jpg")
        assert thumbnail.is_file() and thumbnail.read_bytes()[:2] == b"\xff\xd8", thumbnail.name  # a JPEG
        assert thumbnail.stat().st_size < 60_000
        assert json.loads(path.read_text())["groups"]
