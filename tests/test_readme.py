import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands():
    return re.findall(r"```bash\n(python3 -m venv[^\n]*)\n```", (ROOT / "README.md").read_text())


def test_readme_has_two_setup_commands_and_ci_runs_the_test_one():
    demo, test = readme_commands()
    assert "python -m i2vedit_core" in demo and "pytest" in test
    assert test in (ROOT / ".ci" / "run").read_text().splitlines()
