"""The commands of README.md and README.es.md: every line of their shell code blocks, as a user would type it.

Generic on purpose (another section, another command: nothing to change here): a fenced block tagged bash, sh,
shell or console is read line by line; `#` comment lines and blank lines are dropped, a trailing `  # note` is
cut, a line ending in `\\` continues on the next, and `a && b` is two commands run in that order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
READMES = (ROOT / "README.md", ROOT / "README.es.md")
SHELL_BLOCKS = ("bash", "sh", "shell", "console")
_FENCE = re.compile(r"^```(\w*)\s*$")
_TRAILING_COMMENT = re.compile(r"\s+#\s.*$")


@dataclass(frozen=True)
class Command:
    text: str  # as written (without its comment)
    readme: str  # file name
    line: int  # where it starts

    def where(self) -> str:
        return f"{self.readme}:{self.line}"


def readme_commands(path: Path) -> list[Command]:
    """Every command of `path`'s shell code blocks, in order."""
    commands: list[Command] = []
    block = None  # the language of the fenced block we are in; None outside any
    pending, start = "", 0
    for number, raw in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        fence = _FENCE.match(raw.strip())
        if fence:
            block = fence.group(1) if block is None else None
            continue
        if block not in SHELL_BLOCKS:
            continue
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        line = _TRAILING_COMMENT.sub("", line)
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        full = (pending + line).strip()
        pending = ""
        for part in full.split(" && "):
            commands.append(Command(part.strip(), Path(path).name, start))
    return commands


def all_readme_commands() -> list[str]:
    """The commands of README.md (README.es.md holds the same ones: tests/test_readme_commands.py checks it)."""
    return [c.text for c in readme_commands(READMES[0])]
