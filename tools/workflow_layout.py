"""Positions, sizes and groups of an example workflow: columns of titled stages, nodes stacked inside them.

A workflow is {"note": Note spec, "columns": [[stage, ...], ...]}; a stage is {"title", "columns": [[spec, ...]]}.
Columns run left to right, stages within a column top to bottom, a stage's own columns side by side.
Node heights are estimated as the front-end computes them (LiteGraph: 20 px per slot row, 24 px per widget
row, plus a margin); a spec's `h`/`wd` only ever enlarges a node (room for previews, text boxes).
The browser tier checks the result in the real front-end: no overlaps, no node larger than laid out.
"""

from typing import Dict, List, Tuple

TITLE = 30           # LiteGraph.NODE_TITLE_HEIGHT: drawn above a node's pos
SLOT, WIDGET, MARGIN = 20, 24, 14
WIDTH = 320
NODE_GAP, COLUMN_GAP, STAGE_GAP = 30, 40, 70
PAD, HEADER = 20, 50  # group padding; group title band (font 24)
VIEW = (70, 90, 1500, 880)  # where the graph should land in a 1600x1000 window (menu bars left and top)
GROUP_COLOR = "#3f789e"
# Room for what a run shows: loader previews, Save Video's player, image previews (16:9 frames at WIDTH),
# and the progress text ComfyUI shows under a node that sends it (every I2VEdit node).
RUN_HEIGHT = {"LoadImage": 360, "LoadImageMask": 360, "LoadVideo": 360, "SaveVideo": 380, "PreviewImage": 300,
              "SaveImage": 300}
PROGRESS_TEXT = 60


def node_height(spec: dict, definition) -> int:
    if definition is None:  # UI-only nodes (Note) carry their own size
        return spec.get("h", 120)
    slots = max(sum(1 for s in definition.inputs if not s.widget), len(definition.outputs))
    rows = sum(s.values for s in definition.widgets)
    estimate = slots * SLOT + rows * WIDGET + (MARGIN if rows else 6) + 10
    if spec["type"].startswith("I2VEdit"):
        estimate += PROGRESS_TEXT
    return max(estimate, RUN_HEIGHT.get(spec["type"], 0), spec.get("h", 0))


def note_height(text: str, chars_per_line: int = 52, line: int = 16) -> int:
    """The Note's text box (monospace, ~52 characters a line at its width) without a scroll bar."""
    lines = sum(1 + len(part) // chars_per_line for part in text.split("\n"))
    return lines * line + 40


def layout(workflow: dict, definitions) -> Tuple[List[dict], List[dict], dict]:
    """Placed node specs (pos, size added), group dicts and the canvas view (ds) that shows them all."""
    note = dict(workflow["note"], pos=(0, TITLE), size=(WIDTH + 2 * PAD, note_height(workflow["note"]["text"])))
    placed, groups = [note], []
    x = 0
    for index, column in enumerate(workflow["columns"]):
        y, width = (note["size"][1] + TITLE + STAGE_GAP, note["size"][0]) if index == 0 else (0, 0)
        for stage in column:
            group = _place_stage(stage, x, y, definitions, placed)
            group["id"] = len(groups) + 1
            groups.append(group)
            y += group["bounding"][3] + STAGE_GAP
            width = max(width, group["bounding"][2])
        x += width + STAGE_GAP
    return placed, groups, _view(placed, groups)


def _place_stage(stage: dict, x0: int, y0: int, definitions, placed: List[dict]) -> dict:
    x, bottom = x0 + PAD, y0 + HEADER
    for column in stage["columns"]:
        y, width = y0 + HEADER + TITLE, 0
        for spec in column:
            size = (spec.get("wd", WIDTH), node_height(spec, definitions.get(spec["type"])))
            placed.append(dict(spec, pos=(x, y), size=size))
            y += size[1] + TITLE + NODE_GAP
            width = max(width, size[0])
        bottom = max(bottom, y - TITLE - NODE_GAP)
        x += width + COLUMN_GAP
    bounding = [x0, y0, x - COLUMN_GAP + PAD - x0, bottom + PAD - y0]
    return {"title": stage["title"], "bounding": bounding, "color": GROUP_COLOR, "font_size": 24, "flags": {}}


def _view(placed: List[dict], groups: List[dict]) -> dict:
    boxes = [(s["pos"][0], s["pos"][1] - TITLE, s["size"][0], s["size"][1] + TITLE) for s in placed]
    boxes += [tuple(g["bounding"]) for g in groups]
    left, top = min(b[0] for b in boxes), min(b[1] for b in boxes)
    right, bottom = max(b[0] + b[2] for b in boxes), max(b[1] + b[3] for b in boxes)
    scale = round(min(1.0, VIEW[2] / (right - left), VIEW[3] / (bottom - top)), 3)
    return {"scale": scale, "offset": [round(VIEW[0] / scale - left, 1), round(VIEW[1] / scale - top, 1)]}


def boxes_overlap(a, b) -> bool:
    """Axis-aligned [x, y, w, h] boxes share some area (touching edges do not count)."""
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def overlaps(boxes: Dict[str, list]) -> List[Tuple[str, str]]:
    names = sorted(boxes)
    return [(a, b) for i, a in enumerate(names) for b in names[i + 1:] if boxes_overlap(boxes[a], boxes[b])]
