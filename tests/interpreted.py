"""Run a script in a fresh Python whose Triton kernels execute under the CPU interpreter (tests that check the
CUDA kernels' numerics on the CPU). TRITON_INTERPRET must be set before triton is imported, hence a new
process; the project root goes first on PYTHONPATH and the caller's PYTHONPATH stays after it (a GPU machine
may keep the standalone wheels there)."""
import json
import os
import subprocess
import sys


def run_interpreted(script: str, *args: str, timeout: float = 600):
    """The JSON the script prints on its last line; its stderr's tail if it fails."""
    path = os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=path)
    done = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
