"""UI-format (litegraph) workflows against live ComfyUI node definitions: read the definitions, check a workflow.

Used by tools/build_workflows.py (to lay widgets out) and the host test tests/host/test_workflows.py (to
check every shipped workflow). Needs ComfyUI importable (COMFYUI_PATH on sys.path, CPU mode set).
"""

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
SEED_NAMES = ("seed", "noise_seed")  # the front-end adds a control widget to these (and control_after_generate)
UPLOADS = ("image_upload", "video_upload", "animated_image_upload", "audio_upload")
UI_ONLY = {"Note", "MarkdownNote", "PrimitiveNode", "Reroute"}


@dataclass
class Slot:
    name: str
    type: str
    widget: bool
    values: int          # how many widgets_values entries the front-end stores for it
    options: Tuple = ()  # combo choices
    default: object = None


@dataclass
class NodeDef:
    inputs: List[Slot]
    outputs: List[str]

    def slot(self, name: str) -> Slot:
        return next(s for s in self.inputs if s.name == name)

    @property
    def widgets(self) -> List[Slot]:
        return [s for s in self.inputs if s.widget]


def _slot(name: str, spec) -> Slot:
    kind, extra = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
    options = tuple(kind) if isinstance(kind, (list, tuple)) else tuple(extra.get("options", ()))
    kind = "COMBO" if isinstance(kind, (list, tuple)) else str(kind)
    widget = kind in WIDGET_TYPES and not extra.get("forceInput")
    values = 1
    if widget and (extra.get("control_after_generate") or (kind == "INT" and name in SEED_NAMES)):
        values = 2
    if widget and any(extra.get(u) for u in UPLOADS):
        values = 2  # the upload button stores its own value
    default = extra.get("default", options[0] if options else None)
    return Slot(name, kind, widget, values if widget else 0, options, default)


def node_definition(cls) -> NodeDef:
    spec = cls.INPUT_TYPES()
    inputs = [_slot(n, s) for part in ("required", "optional") for n, s in spec.get(part, {}).items()]
    return NodeDef(inputs, [str(t) if not isinstance(t, list) else "COMBO" for t in cls.RETURN_TYPES])


def live_definitions(pack: Path) -> Dict[str, NodeDef]:
    """Every node ComfyUI registers at start-up (core, comfy_extras) plus this pack."""
    import nodes

    preload_comfy_utils()

    async def init():
        if "KarrasScheduler" not in nodes.NODE_CLASS_MAPPINGS:
            await nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False)
        if "I2VEditPropagate" not in nodes.NODE_CLASS_MAPPINGS:
            assert await nodes.load_custom_node(str(pack)), "the pack failed to load"
    asyncio.run(init())
    return {name: node_definition(cls) for name, cls in nodes.NODE_CLASS_MAPPINGS.items()}


def preload_comfy_utils() -> None:
    """Import ComfyUI's `utils` package first: comfy_extras put `comfy/utils.py` in sys.modules as `utils`
    otherwise, and then nodes_images (ImageFromBatch, ...) fails on `utils.install_util` (main.py imports
    the server early and never sees this). Also stands in for `requests` where it is missing (below)."""
    import importlib
    import importlib.util
    import sys
    import types

    import comfy.model_patcher

    if importlib.util.find_spec("requests") is None:
        # ComfyUI v0.3.64 imports `requests` (app/frontend_management.py, reached through `server`, which
        # nodes_images imports) without listing it in requirements.txt, and uses it only to download other
        # front-end versions. Where the environment lacks it, an empty module keeps the registry complete.
        sys.modules.setdefault("requests", types.ModuleType("requests"))
    loaded = sys.modules.get("utils")
    if loaded is None or not hasattr(loaded, "__path__"):
        folder = Path(comfy.model_patcher.__file__).resolve().parents[1] / "utils"
        spec = importlib.util.spec_from_file_location("utils", folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])
        sys.modules["utils"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["utils"])
    importlib.import_module("utils.install_util")


def check_workflow(workflow: dict, definitions: Dict[str, NodeDef]) -> List[str]:
    """Problems of a UI-format workflow: unknown node types, links that do not type-check, widget counts."""
    problems = []
    nodes = {n["id"]: n for n in workflow["nodes"]}
    for node in workflow["nodes"]:
        problems += _check_node(node, definitions)
    for link in workflow["links"]:
        problems += _check_link(link, nodes, definitions)
    if not any(n["type"] in ("Note", "MarkdownNote") for n in workflow["nodes"]):
        problems.append("no Note node explaining what to change first")
    return problems


def _check_node(node: dict, definitions) -> List[str]:
    kind = node["type"]
    if kind in UI_ONLY:
        return []
    if kind not in definitions:
        return [f"node {node['id']}: unknown node type {kind!r}"]
    definition, problems = definitions[kind], []
    expected = sum(s.values for s in definition.widgets)
    values = node.get("widgets_values", [])
    if len(values) != expected:
        problems.append(f"node {node['id']} ({kind}): {len(values)} widget values, the node has {expected}")
    else:
        problems += _check_choices(node, definition)
    for slot in node.get("inputs", []):
        if slot["name"] not in {s.name for s in definition.inputs}:
            problems.append(f"node {node['id']} ({kind}): no input named {slot['name']!r}")
    if len(node.get("outputs", [])) > len(definition.outputs):
        problems.append(f"node {node['id']} ({kind}): {len(node['outputs'])} outputs, the node has "
                        f"{len(definition.outputs)}")
    return problems


def _check_choices(node: dict, definition: NodeDef) -> List[str]:
    """Combo values against the node's choices, except file names (what a user's folders hold varies)."""
    problems, index = [], 0
    for slot in definition.widgets:
        value = node["widgets_values"][index]
        index += slot.values
        a_file = "." in str(value) or any("." in str(option) for option in slot.options)
        if slot.type == "COMBO" and not a_file and value not in slot.options:
            problems.append(f"node {node['id']} ({node['type']}): {slot.name}={value!r} is not one of "
                            f"{list(slot.options)}")
    return problems


def _check_link(link, nodes, definitions) -> List[str]:
    link_id, src, src_slot, dst, dst_slot, kind = link
    if src not in nodes or dst not in nodes:
        return [f"link {link_id}: missing node"]
    source, target = nodes[src], nodes[dst]
    out_type = definitions[source["type"]].outputs[src_slot]
    target_input = target["inputs"][dst_slot]
    in_type = definitions[target["type"]].slot(target_input["name"]).type
    problems = []
    if target_input.get("link") != link_id:
        problems.append(f"link {link_id}: input {target_input['name']!r} of node {dst} does not point back to it")
    if "*" not in (out_type, in_type) and out_type != in_type:
        problems.append(f"link {link_id}: {source['type']} output {out_type} into {target['type']}."
                        f"{target_input['name']} ({in_type})")
    return problems


def api_prompt(workflow: dict, definitions: Dict[str, NodeDef]) -> Dict[str, dict]:
    """The API-format prompt that queuing a UI-format workflow sends: widget values by name (a seed's control
    and an upload button's value left out), linked inputs as [node id, output slot]; Notes dropped."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in UI_ONLY:
            continue
        inputs, values = {}, list(node.get("widgets_values", []))
        for slot in definitions[node["type"]].widgets:
            inputs[slot.name] = values[0]
            values = values[slot.values:]
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                link = links[slot["link"]]
                inputs[slot["name"]] = [str(link[1]), link[2]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt
