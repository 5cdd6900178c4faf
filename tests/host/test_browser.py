"""Browser tier: ComfyUI served on 127.0.0.1 with only this pack, every workflow opened in headless Chromium.

Needs the system Chromium (/usr/bin/chromium, or $CHROMIUM) and playwright-core for Node
(`npm install playwright-core` in tests/host/browser, or on NODE_PATH); skips with that reason
otherwise. Screenshots go to tests/host/browser/screenshots/ (git-ignored).
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pack import REPO

BROWSER_DIR = Path(__file__).parent / "browser"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")


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


@pytest.fixture(scope="module")
def comfy_url(comfyui_root, tmp_path_factory):
    reason = missing_tools()
    if reason:
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("browser_base")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "i2vedit").symlink_to(REPO, target_is_directory=True)
    port = free_port()
    command = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory",
               str(base), "--disable-all-custom-nodes", "--whitelist-custom-nodes", "i2vedit",
               "--database-url", "sqlite:///:memory:", "--disable-api-nodes"]
    server = subprocess.Popen(command, cwd=comfyui_root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, server)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_every_workflow_opens_without_missing_nodes(comfy_url):
    shots = BROWSER_DIR / "screenshots"
    shots.mkdir(exist_ok=True)
    workflows = sorted(str(p) for p in (REPO / "workflows").glob("*.json"))
    result = subprocess.run(["node", "open_workflows.mjs", comfy_url, str(shots), *workflows], cwd=BROWSER_DIR,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    reports = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == len(workflows)
    for report in reports:
        assert report["missing"] == [] and not report["dialog"], report
        assert report["extension"], f"js extension i2vedit.ui not registered: {report}"
    assert len(list(shots.glob("*.png"))) == len(workflows)
