"""Every workflow in workflows/ against the live node definitions (ComfyUI's + this pack's).

All node types exist, every link type-checks and points back from its input, widget counts are what
the front-end stores, each workflow has a Note, and together they use every node of the pack but the
SAMPLER node (shown in the README instead).
"""

import json
import sys

import pytest

from pack import REPO

sys.path.insert(0, str(REPO / "tools"))
WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))


@pytest.fixture(scope="module")
def definitions():
    from workflow_format import live_definitions

    return live_definitions(REPO)


def test_there_are_six_workflows():
    assert len(WORKFLOWS) == 6


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_matches_live_nodes(path, definitions):
    from workflow_format import check_workflow

    workflow = json.loads(path.read_text())
    assert check_workflow(workflow, definitions) == []
    types = {n["type"] for n in workflow["nodes"]}
    assert any(t.startswith("I2VEdit") for t in types)


def test_checker_catches_mistakes(definitions):
    from workflow_format import check_workflow

    workflow = json.loads(WORKFLOWS[0].read_text())
    workflow["nodes"][0]["widgets_values"].append("extra")
    workflow["nodes"].append(dict(id=500, type="NoSuchNode", inputs=[], outputs=[], widgets_values=[]))
    link = workflow["links"][0]
    link[5] = "IMAGE"
    problems = check_workflow(workflow, definitions)
    assert any("widget values" in p for p in problems) and any("NoSuchNode" in p for p in problems)


def test_workflows_cover_the_pack(definitions):
    used = {n["type"] for p in WORKFLOWS for n in json.loads(p.read_text())["nodes"]}
    pack = {name for name in definitions if name.startswith("I2VEdit")}
    assert pack - used == {"I2VEditInversionSampler", "I2VEditMatchedSampler"}


def test_pack_registers_every_node(definitions):
    assert {n for n in definitions if n.startswith("I2VEdit")} == {
        "I2VEditSourceClips", "I2VEditInvert", "I2VEditTrainMotionLora", "I2VEditSaveMotionLora",
        "I2VEditLoadMotionLora", "I2VEditPropagate", "I2VEditEditVideo", "I2VEditInversionSampler",
        "I2VEditMatchedSampler", "I2VEditMetrics"}
