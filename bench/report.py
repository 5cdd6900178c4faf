"""A profile's markdown report: each line printed as it comes and kept, written to OUT/name at the end."""

from pathlib import Path


class Report:
    def __init__(self):
        self.lines = []

    def __call__(self, text: str) -> None:
        print(text, flush=True)
        self.lines.append(text)

    def write(self, out, name: str) -> None:
        """OUT/name with every line so far; nothing without an OUT folder."""
        if out:
            Path(out).mkdir(parents=True, exist_ok=True)
            (Path(out) / name).write_text("\n".join(self.lines) + "\n")
