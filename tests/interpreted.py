"""Environment for a fresh Python that runs Triton kernels under its CPU interpreter (tests that check the
CUDA kernels' numerics on the CPU). TRITON_INTERPRET must be set before triton is imported, hence a new
process; the project root goes first on PYTHONPATH and the caller's PYTHONPATH stays after it (a GPU machine
may keep the standalone wheels there)."""
import os


def interpreter_env() -> dict:
    path = os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=path)
