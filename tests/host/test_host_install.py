"""What ComfyUI-Manager installs, against a real ComfyUI environment (issue 15 item 1).

1. `pip install --dry-run --report` of ComfyUI's requirements.txt plus ours, in this environment,
   would change no installed package (only new ones, such as opencv-python-headless, may appear).
2. With diffusers, peft, accelerate and transformers' CLIP vision model blocked (as if not installed:
   `import` raises ModuleNotFoundError, `importlib.util.find_spec` returns None), the pack loads and an API-format node graph runs through PromptExecutor
   on a tiny SVD built from ComfyUI's classes alone.
"""

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from pack import REPO

HOST_DIR = Path(__file__).parent
# Not the whole of transformers: ComfyUI itself imports it (tokenizers). The diffusers backend's
# CLIPVisionModelWithProjection lives in modeling_clip.
BLOCKED = ("diffusers", "peft", "accelerate", "transformers.models.clip.modeling_clip")
INDEX_TROUBLE = ("Could not find a version", "No matching distribution", "NewConnectionError", "Connection",
                 "Network is unreachable", "Temporary failure in name resolution", "HTTPError")


def canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def installed_versions() -> dict:
    return {canonical(d.metadata["Name"]): d.version for d in metadata.distributions() if d.metadata["Name"]}


def test_installing_our_requirements_changes_no_installed_package(comfyui_root, tmp_path):
    report_path = tmp_path / "report.json"
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report", str(report_path),
               "-r", str(comfyui_root / "requirements.txt"), "-r", str(REPO / "requirements.txt")]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    except (OSError, subprocess.TimeoutExpired) as error:
        pytest.skip(f"pip is not usable here: {error}")
    if result.returncode != 0:
        if "No module named pip" in result.stderr or any(t in result.stderr for t in INDEX_TROUBLE):
            pytest.skip(f"pip cannot reach a package index here: {result.stderr.strip()[-400:]}")
        raise AssertionError(f"pip could not resolve ComfyUI's requirements with ours:\n{result.stderr[-3000:]}")
    report = json.loads(report_path.read_text())
    before = installed_versions()
    wanted = {canonical(item["metadata"]["name"]): item["metadata"]["version"] for item in report["install"]}
    changed = {name: f"{before[name]} -> {version}" for name, version in wanted.items() if name in before}
    assert changed == {}, f"installing requirements.txt would up/downgrade ComfyUI's packages: {changed}"
    ours = {canonical(line.split(">=")[0].strip()) for line in (REPO / "requirements.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")}
    assert ours <= set(wanted) | set(before)


GRAPH_WITHOUT_STANDALONE = r'''
import asyncio, sys, tempfile
from pathlib import Path

BLOCKED = {blocked!r}
for name in BLOCKED:  # as if not installed: `import` raises ModuleNotFoundError, find_spec() returns None
    sys.modules[name] = None

sys.path[:0] = [{comfyui!r}, {host!r}, {tools!r}]
import comfy.cli_args
comfy.cli_args.args.cpu = True
comfy.cli_args.args.use_pytorch_cross_attention = True
import folder_paths, nodes, execution, types
import tiny_comfy
from test_prompt_executor import LOADER, StubServer, graph
from workflow_format import preload_comfy_utils

work = Path(tempfile.mkdtemp())
holder = types.ModuleType("i2vedit_test_parts")
holder.parts = tiny_comfy.comfy_parts_without_diffusers(work)
sys.modules[holder.__name__] = holder
(work / "tiny_svd_loader.py").write_text(LOADER)
for name in ("output", "temp", "loras"):
    (work / name).mkdir()
folder_paths.set_output_directory(str(work / "output"))
folder_paths.set_temp_directory(str(work / "temp"))
folder_paths.add_model_folder_path("loras", str(work / "loras"), is_default=True)
preload_comfy_utils()

async def run():
    await nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False)
    assert await nodes.load_custom_node(str(work / "tiny_svd_loader.py"))
    assert await nodes.load_custom_node({repo!r}), "the pack did not load"
    prompt = graph()
    valid = await execution.validate_prompt("p1", prompt, None)
    assert valid[0], valid[1:]
    executor = execution.PromptExecutor(StubServer())
    await executor.execute_async(prompt, "p1", {{}}, valid[2])
    return executor, prompt

executor, prompt = asyncio.run(run())
errors = [m for m in executor.status_messages if m[0] == "execution_error"]
assert executor.success, errors
print("nodes run:", sorted({{v["class_type"] for v in prompt.values() if v["class_type"].startswith("I2VEdit")}}))
print("report:", executor.history_result["outputs"]["9"]["text"][0].splitlines()[0])
print("blocked modules loaded:", sorted(m for m, v in sys.modules.items()
                                        if v is not None and any(m == b or m.startswith(b + ".") for b in BLOCKED)))
'''


def test_pack_loads_and_a_graph_runs_without_the_standalone_stack(comfyui_root, tmp_path):
    script = GRAPH_WITHOUT_STANDALONE.format(blocked=BLOCKED, comfyui=str(comfyui_root), host=str(HOST_DIR),
                                             tools=str(REPO / "tools"), repo=str(REPO))
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                            cwd=tmp_path, env=env)
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    assert "blocked modules loaded: []" in result.stdout
    nodes_run = result.stdout.split("nodes run:")[1].splitlines()[0]
    for node in ("I2VEditInvert", "I2VEditTrainMotionLora", "I2VEditPropagate", "I2VEditMetrics"):
        assert node in nodes_run
