"""Every workflow in example_workflows/ against the live node definitions (ComfyUI's + this pack's).

All node types exist, every link type-checks and points back from its input, widget counts are what
the front-end stores, combo values are among the choices, each workflow has a Note and titled groups,
names are numbered so that they sort in the template browser, and together they use every node of the
pack but the Inversion Sampler (shown in the README instead: the Matched Sampler needs I2VEdit Invert's
stored source trajectory, which a SAMPLER cannot hand over).
"""

import json
import re
import sys

import pytest

from pack import REPO

sys.path.insert(0, str(REPO / "tools"))
WORKFLOWS = sorted((REPO / "example_workflows").glob("*.json"))


@pytest.fixture(scope="module")
def definitions():
    from workflow_format import live_definitions

    return live_definitions(REPO)


def test_there_are_eight_numbered_workflows():
    assert [p.stem[:3] for p in WORKFLOWS] == [f"{n:02d}_" for n in range(1, 9)]
    assert all(re.fullmatch(r"\d\d_[a-z0-9_]+", p.stem) for p in WORKFLOWS)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_has_titled_stages_and_a_note_first(path):
    workflow = json.loads(path.read_text())
    assert len(workflow["groups"]) >= 3 and all(g["title"] for g in workflow["groups"])
    note = next(n for n in workflow["nodes"] if n["type"] == "Note")
    assert "change first" in note["widgets_values"][0].lower()
    assert note["pos"][1] <= min(n["pos"][1] for n in workflow["nodes"])  # at the top


def test_one_workflow_edits_frame_0_with_an_instruction_edit_model(definitions):
    """Qwen-Image-Edit, native in ComfyUI: its text encoder takes frame 0 and feeds the sampler."""
    from workflow_format import check_workflow

    workflow = json.loads((REPO / "example_workflows" / "07_qwen_image_edit.json").read_text())
    types = {n["id"]: n["type"] for n in workflow["nodes"]}
    fed = {(types[link[1]], types[link[3]]) for link in workflow["links"]}
    assert {("TextEncodeQwenImageEdit", "KSampler"), ("ImageFromBatch", "ImageScaleToTotalPixels"),
            ("ImageScale", "I2VEditEditVideo"), ("GetImageSize", "ImageScale")} <= fed
    assert check_workflow(workflow, definitions) == []


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_matches_live_nodes(path, definitions):
    from workflow_format import check_workflow

    workflow = json.loads(path.read_text())
    assert check_workflow(workflow, definitions) == []
    types = {n["type"] for n in workflow["nodes"]}
    assert any(t.startswith("I2VEdit") for t in types)


def test_checker_catches_mistakes(definitions):
    from workflow_format import check_workflow

    workflow = json.loads(WORKFLOWS[1].read_text())
    nodes = {n["type"]: n for n in workflow["nodes"]}
    nodes["KSampler"]["widgets_values"][4] = "no_such_sampler"
    assert check_workflow(workflow, definitions) == ["node 26 (KSampler): sampler_name='no_such_sampler' is not one "
                                                     f"of {list(definitions['KSampler'].slot('sampler_name').options)}"]
    nodes["I2VEditEditVideo"]["widgets_values"].append("extra")
    workflow["nodes"].append(dict(id=500, type="NoSuchNode", inputs=[], outputs=[], widgets_values=[]))
    vae = next(link for link in workflow["links"] if link[5] == "VAE")
    workflow["links"].append([99, 1, 0, vae[3], vae[4], "MODEL"])  # a MODEL into a VAE input
    problems = check_workflow(workflow, definitions)
    count = sum(slot.values for slot in definitions["I2VEditEditVideo"].widgets)
    assert any(f"{count + 1} widget values, the node has {count}" in p for p in problems), problems
    assert any("NoSuchNode" in p for p in problems) and any("output MODEL into" in p for p in problems)


def test_workflows_cover_the_pack(definitions):
    used = {n["type"] for p in WORKFLOWS for n in json.loads(p.read_text())["nodes"]}
    pack = {name for name in definitions if name.startswith("I2VEdit")}
    assert pack - used == {"I2VEditInversionSampler"}


def test_one_workflow_chains_the_composable_parts(definitions):
    """An image edit of frame 0, I2VEdit Invert, the motion LoRA through core LoraLoaderModelOnly into both the
    guider and the Matched Sampler, the sampler in SamplerCustomAdvanced, decoded and saved as a video."""
    from workflow_format import check_workflow

    workflow = json.loads((REPO / "example_workflows" / "08_composable_matched_sampler.json").read_text())
    types = {n["id"]: n["type"] for n in workflow["nodes"]}
    fed = {(types[link[1]], types[link[3]], link[5]) for link in workflow["links"]}
    assert {("KSampler", "VAEDecode", "LATENT"), ("VAEDecode", "I2VEditEditConditioning", "IMAGE"),
            ("I2VEditInvert", "I2VEditEditConditioning", "I2VEDIT_INVERSION"),
            ("I2VEditInvert", "I2VEditMatchedSampler", "I2VEDIT_INVERSION"),
            ("LoraLoaderModelOnly", "CFGGuider", "MODEL"), ("LoraLoaderModelOnly", "I2VEditMatchedSampler", "MODEL"),
            ("I2VEditEditConditioning", "CFGGuider", "CONDITIONING"), ("CFGGuider", "SamplerCustomAdvanced", "GUIDER"),
            ("I2VEditMatchedSampler", "SamplerCustomAdvanced", "SAMPLER"),
            ("KarrasScheduler", "SamplerCustomAdvanced", "SIGMAS"), ("DisableNoise", "SamplerCustomAdvanced", "NOISE"),
            ("I2VEditEditConditioning", "SamplerCustomAdvanced", "LATENT"), ("SamplerCustomAdvanced", "VAEDecode", "LATENT"),
            ("CreateVideo", "SaveVideo", "VIDEO")} <= fed
    invert = next(n for n in workflow["nodes"] if n["type"] == "I2VEditInvert")
    karras = next(n for n in workflow["nodes"] if n["type"] == "KarrasScheduler")
    assert karras["widgets_values"][:3] == [invert["widgets_values"][0], 700.0, 0.002]  # the inversion's schedule
    assert check_workflow(workflow, definitions) == []


def test_pack_registers_every_node(definitions):
    assert {n for n in definitions if n.startswith("I2VEdit")} == {
        "I2VEditSourceClips", "I2VEditInvert", "I2VEditTrainMotionLora", "I2VEditSaveMotionLora",
        "I2VEditLoadMotionLora", "I2VEditPropagate", "I2VEditEditVideo", "I2VEditInversionSampler",
        "I2VEditMatchedSampler", "I2VEditEditConditioning", "I2VEditMetrics"}


def test_api_prompt_is_what_the_front_end_queues(definitions):
    """Widget values by name, links as [id, slot], the seed's control value and the Note left out."""
    from workflow_format import api_prompt

    workflow = json.loads((REPO / "example_workflows" / "03_instruct_edit.json").read_text())
    prompt = api_prompt(workflow, definitions)
    assert "99" not in prompt and len(prompt) == len(workflow["nodes"]) - 1
    sampler = prompt["26"]
    assert sampler["class_type"] == "KSampler" and sampler["inputs"]["seed"] == 0
    assert sampler["inputs"]["sampler_name"] == "euler" and sampler["inputs"]["cfg"] == 7.5
    assert sampler["inputs"]["positive"] == ["25", 0] and sampler["inputs"]["negative"] == ["25", 1]
    assert prompt["10"]["inputs"]["edited_first_frame"] == ["27", 0] and prompt["10"]["inputs"]["preset"] == "local"
    assert prompt["2"]["inputs"] == {"file": "source.mp4"}
