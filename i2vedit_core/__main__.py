from .cli import main
from .distributed import run_under_torchrun

raise SystemExit(run_under_torchrun(main))
