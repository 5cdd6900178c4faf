"""Browser tier: ComfyUI served on 127.0.0.1 with only this pack, every shipped workflow opened in headless Chromium.

Needs the system Chromium (/usr/bin/chromium, or $CHROMIUM) and playwright-core for Node
(`npm install playwright-core` in tests/host/browser, or on NODE_PATH); skips with that reason
otherwise. Screenshots go to tests/host/browser/screenshots/ (git-ignored).

Each workflow is opened as a user opens it, then "run": its input files appear (the loaders show their
previews), outputs arrive as ComfyUI sends them (Save Video's player, image previews) and every I2VEdit
node shows progress text. Node boxes come from the page's LiteGraph graph (positions and sizes after load).
The thumbnails example_workflows/<name>.jpg (the name ComfyUI's template browser asks custom nodes for) are
those screenshots; `I2VEDIT_WRITE_THUMBNAILS=1` rewrites them.
"""

import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pack import REPO

sys.path.insert(0, str(REPO / "tools"))
BROWSER_DIR = Path(__file__).parent / "browser"
SHOTS = BROWSER_DIR / "screenshots"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
WORKFLOWS = sorted((REPO / "example_workflows").glob("*.json"))
THUMBNAIL = (512, 320)     # shown at 256 px wide in the template browser
THUMBNAIL_BYTES = 60_000
LOADERS = {"LoadImage": "image", "LoadImageMask": "image", "LoadVideo": "file"}
VIDEO = {"filename": "i2vedit_00001_.mp4", "subfolder": "video", "type": "output"}
PICTURE = {"filename": "i2vedit_preview.png", "subfolder": "", "type": "output"}
PREVIEW_WIDGETS = {"video-preview", "$$canvas-image-preview", "$$node-text-preview"}  # the front-end's names
METRICS_TEXT = "\n".join(f"{n}: 0.1234" for n in ("warp_error", "warp_error_source", "flicker", "flicker_source",
                                                  "psnr_unedited", "ssim_unedited", "seam_colour_drift",
                                                  "seam_colour_drift_source"))


def missing_tools():
    if not Path(CHROMIUM).is_file():
        return f"browser tier: no Chromium at {CHROMIUM} (apt-get install chromium, or set CHROMIUM)"
    if shutil.which("node") is None:
        return "browser tier: node is not installed"
    probe = subprocess.run(["node", "-e", "import('playwright-core').then(() => 0)"], cwd=BROWSER_DIR,
                           capture_output=True, text=True)
    if probe.returncode != 0:
        return "browser tier: playwright-core is not installed (cd tests/host/browser && npm install playwright-core)"
    return None


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url, server, seconds=180):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"ComfyUI exited:\n{server.stdout.read()[-4000:]}")
        try:
            urllib.request.urlopen(url + "/object_info/I2VEditPropagate", timeout=2)
            return
        except OSError:
            time.sleep(1)
    raise AssertionError("ComfyUI did not start in time")


def stub_requests(base):
    """A folder with an empty `requests` when the environment lacks it, else None.

    ComfyUI v0.3.64 imports `requests` at start-up (app/frontend_management.py) without listing it in its
    requirements; it only uses it to download other front-end versions, which this server is never asked to.
    """
    if importlib.util.find_spec("requests") is not None:
        return None
    folder = base / "stubs"
    folder.mkdir()
    (folder / "requests.py").write_text('"""Stand-in: the browser-tier server never downloads a front-end."""\n')
    return str(folder)


def write_media(base, staging):
    """What a run leaves behind: the workflows' input files (staged, copied in mid-test) and two outputs."""
    import av
    import numpy as np
    from PIL import Image

    picture = Image.linear_gradient("L").resize((1024, 576)).convert("RGB")
    (base / "output" / "video").mkdir(parents=True)
    picture.save(base / "output" / PICTURE["filename"])
    write_video(base / "output" / "video" / VIDEO["filename"], np.asarray(picture), av)
    copies = []
    for path in WORKFLOWS:
        for node in json.loads(path.read_text())["nodes"]:
            if node["type"] in LOADERS:
                name = node["widgets_values"][0]
                staged = staging / name
                if name.endswith(".mp4"):
                    write_video(staged, np.asarray(picture), av)
                else:
                    picture.convert("RGBA").save(staged, format="PNG")
                copies.append([str(staged), str(base / "input" / name)])
    return copies


def write_video(path, frame, av):
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = frame.shape[1], frame.shape[0], "yuv420p"
        for _ in range(4):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


@pytest.fixture(scope="module")
def comfy(comfyui_root, tmp_path_factory):
    reason = missing_tools()
    if reason:
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("browser_base")
    for folder in ("custom_nodes", "input", "output"):
        (base / folder).mkdir()
    (base / "custom_nodes" / "i2vedit").symlink_to(REPO, target_is_directory=True)
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [stub_requests(base), os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory",
               str(base), "--disable-all-custom-nodes", "--whitelist-custom-nodes", "i2vedit",
               "--database-url", "sqlite:///:memory:", "--disable-api-nodes"]
    server = subprocess.Popen(command, cwd=comfyui_root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, server)
        yield url, base
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def reports(comfy, tmp_path_factory):
    url, base = comfy
    staging = tmp_path_factory.mktemp("staging")
    run = {"stage_inputs": write_media(base, staging),
           "outputs": {"SaveVideo": {"images": [VIDEO], "animated": [True]}, "PreviewImage": {"images": [PICTURE]},
                       "SaveImage": {"images": [PICTURE]}},
           "texts": {"I2VEditMetrics": METRICS_TEXT}}
    (staging / "run.json").write_text(json.dumps(run))
    SHOTS.mkdir(exist_ok=True)
    for old in SHOTS.glob("*.png"):
        old.unlink()
    result = subprocess.run(["node", "open_workflows.mjs", url, str(SHOTS), str(staging / "run.json"),
                             *map(str, WORKFLOWS)], cwd=BROWSER_DIR, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    found = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    (SHOTS / "reports.json").write_text(json.dumps(found, indent=1))  # for a look at a failure
    assert [r["name"] for r in found] == [p.name for p in WORKFLOWS]
    return {Path(r["name"]).stem: r for r in found}


def test_every_workflow_opens_without_missing_nodes(reports):
    for report in reports.values():
        assert report["missing"] == [] and not report["dialog"], report
        assert report["extension"], f"js extension i2vedit.ui not registered: {report}"
        assert len(report["open"]["nodes"]) == len(json.loads((REPO / "example_workflows" /
                                                               report["name"]).read_text())["nodes"])


def test_the_preset_fills_the_betas_from_the_core_table(reports):
    """js/i2vedit.js reads the table from the node definition: no copy of it in the page."""
    from pack import load_pack

    load_pack()
    from i2vedit_core.attention import PRESETS

    used = [r["preset"] for r in reports.values() if r["preset"]]
    assert used and all(p == {"type": p["type"], "style": list(PRESETS["style"]), "after_edit": "custom"} for p in used)
    assert not re.search(r"\d\.\d", (REPO / "js" / "i2vedit.js").read_text())  # no beta values of its own


def layout_problems(state):
    """Overlapping node boxes or group boxes, and nodes (but the Note) sticking out of every group."""
    from workflow_layout import boxes_overlap, overlaps

    nodes = {f"{n['id']} {n['type']}": n["box"] for n in state["nodes"]}
    groups = {g["title"]: g["box"] for g in state["groups"]}
    problems = [f"nodes overlap: {a} / {b}" for a, b in overlaps(nodes)]
    problems += [f"groups overlap: {a} / {b}" for a, b in overlaps(groups)]
    for name, box in nodes.items():
        inside = [g for g in groups.values() if contains(g, box)]
        if not name.endswith(" Note") and not inside:
            touching = [t for t, g in groups.items() if boxes_overlap(g, box)]
            problems.append(f"{name} {[round(v) for v in box]} is not inside a group (touches {touching})")
    return problems


def contains(outer, inner):
    return (outer[0] <= inner[0] and outer[1] <= inner[1] and inner[0] + inner[2] <= outer[0] + outer[2]
            and inner[1] + inner[3] <= outer[1] + outer[3])


@pytest.mark.parametrize("state", ["open", "ran"])
def test_no_two_nodes_overlap(reports, state):
    problems = {name: layout_problems(report[state]) for name, report in reports.items()}
    assert {name: p for name, p in problems.items() if p} == {}


def shows_something(node):
    return node["images"] > 0 or bool(set(node["widgets"]) & PREVIEW_WIDGETS)


def test_the_simulated_run_shows_what_a_run_shows(reports):
    """Save Video gets its player, the loaders their previews, every I2VEdit node its progress text."""
    for report in reports.values():
        shown = {n["type"]: shows_something(n) for n in report["ran"]["nodes"]}
        expected = {t for t in shown if t in LOADERS or t.startswith("I2VEdit") or t in ("SaveVideo", "PreviewImage")}
        assert {t for t in expected if not shown[t]} == set(), report["name"]
        assert not any(shows_something(n) for n in report["open"]["nodes"] if n["type"] != "Note"), report["name"]


def test_layout_checker_catches_an_overlap():
    state = {"nodes": [{"id": 1, "type": "A", "box": [0, 0, 100, 100]}, {"id": 2, "type": "B", "box": [90, 90, 50, 50]}],
             "groups": [{"title": "g", "box": [-10, -10, 200, 200]}]}
    assert layout_problems(state) == ["nodes overlap: 1 A / 2 B"]
    state["nodes"][1]["box"] = [100, 0, 50, 50]
    assert layout_problems(state) == []
    state["nodes"][1]["box"] = [100, 0, 150, 50]
    assert "not inside a group" in layout_problems(state)[0]


def thumbnail(screenshot: Path):
    from PIL import Image

    return Image.open(screenshot).convert("RGB").resize(THUMBNAIL, Image.Resampling.LANCZOS)


def test_thumbnails_are_the_screenshots(reports):
    """Each example_workflows/<name>.jpg is this run's screenshot of the opened workflow, small.

    Compared at 128x80, where JPEG noise and run-to-run rendering average out (measured: at most 0.8 of 255
    mean absolute difference) and the closest pair of different workflows (02 and 03, one node apart) still
    differs by 3.
    """
    import numpy as np
    from PIL import Image

    def coarse(image):
        return np.asarray(image.convert("RGB").resize((128, 80), Image.Resampling.BOX), dtype=np.float32)

    write = os.environ.get("I2VEDIT_WRITE_THUMBNAILS") == "1"
    differences = {}
    for name in reports:
        fresh, path = thumbnail(SHOTS / f"{name}.png"), REPO / "example_workflows" / f"{name}.jpg"
        if write:
            fresh.save(path, quality=80, optimize=True)
        assert path.is_file(), f"no thumbnail {path.name}: run with I2VEDIT_WRITE_THUMBNAILS=1"
        assert path.stat().st_size <= THUMBNAIL_BYTES, f"{path.name} is {path.stat().st_size} bytes"
        assert Image.open(path).size == THUMBNAIL
        differences[name] = float(np.abs(coarse(Image.open(path)) - coarse(fresh)).mean())
    assert max(differences.values()) < 1.5, differences
