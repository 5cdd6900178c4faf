"""`main.py --cpu --quick-test-for-ci` with only this pack: ComfyUI starts and imports it cleanly."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACK = "i2vedit"


def test_pack_imports_in_quick_test(comfyui_root, tmp_path):
    base = tmp_path / "base"
    (base / "custom_nodes").mkdir(parents=True)
    (base / "custom_nodes" / PACK).symlink_to(REPO, target_is_directory=True)
    command = [sys.executable, "main.py", "--cpu", "--quick-test-for-ci", "--base-directory", str(base),
               "--disable-all-custom-nodes", "--whitelist-custom-nodes", PACK,
               "--database-url", "sqlite:///:memory:", "--disable-api-nodes"]
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    result = subprocess.run(command, cwd=comfyui_root, env=env, capture_output=True, text=True, timeout=300)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    # ComfyUI lists every pack it tried: "0.0 seconds: <path>" or "0.0 seconds (IMPORT FAILED): <path>".
    import_lines = [line for line in log.splitlines() if line.strip().endswith(f"custom_nodes/{PACK}")]
    assert import_lines, f"the pack was not loaded at all:\n{log[-4000:]}"
    assert not any("IMPORT FAILED" in line for line in import_lines), log[-4000:]
    assert pack_tracebacks(log) == [], log[-4000:]


def pack_tracebacks(log: str):
    """Traceback blocks (up to the blank line that ends them) that pass through this pack. ComfyUI's own
    comfy_extras may print theirs where the environment lacks an optional module (torchaudio: its audio
    nodes), which says nothing about the pack."""
    blocks = [part.split("\n\n")[0] for part in log.split("Traceback (most recent call last):")[1:]]
    return [b for b in blocks if "custom_nodes" in b or "i2vedit" in b or str(REPO) in b]


def test_pack_tracebacks_are_told_from_comfyuis_own():
    comfy = ('WARNING:root:Traceback (most recent call last):\n  File "/c/comfy_extras/nodes_audio.py", line 4, in '
             '<module>\n    import torchaudio\nModuleNotFoundError: No module named \'torchaudio\'\n\nWARNING:root:Cannot')
    ours = ('Traceback (most recent call last):\n  File "/c/nodes.py", line 2131, in load_custom_node\n  File '
            '"/b/custom_nodes/i2vedit/__init__.py", line 3\nImportError: x\n\n0.0 seconds (IMPORT FAILED)')
    assert pack_tracebacks(comfy) == [] and len(pack_tracebacks(comfy + ours)) == 1
