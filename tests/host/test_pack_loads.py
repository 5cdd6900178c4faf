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
    assert "Traceback" not in log, log[-4000:]
