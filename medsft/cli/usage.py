"""What every command says about itself: `--version` (one source: medsft.__version__) and the example block each
`--help` ends with (commands of README.md; tests/test_cli_help.py checks that every one of them is there)."""

from __future__ import annotations

import argparse
import platform
import textwrap
from importlib.metadata import PackageNotFoundError, version

from medsft import __version__

LIBRARIES = ("torch", "transformers", "accelerate", "hydra-core", "deepspeed", "trl")
EXAMPLES_HEADER = "examples (from README.md):"


def version_text(full: bool = False) -> str:
    """`medsft 0.1.0`; with full=True also python and the installed libraries (`deepspeed not installed`), read
    from their metadata (nothing is imported)."""
    text = f"medsft {__version__}"
    if not full:
        return text
    parts = []
    for name in LIBRARIES:
        try:
            parts.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            parts.append(f"{name} not installed")
    return f"{text} (python {platform.python_version()}; {', '.join(parts)})"


def examples_block(examples: list[tuple[str, str]]) -> str:
    """`examples (from README.md):` then one `  command   # what it does` line per (command, note)."""
    width = min(max(len(cmd) for cmd, _ in examples), 72)
    lines = [EXAMPLES_HEADER]
    lines += [f"  {cmd:<{width}}   # {note}" if note else f"  {cmd}" for cmd, note in examples]
    return "\n".join(lines)


class CommandParser(argparse.ArgumentParser):
    """argparse, with `--help` starting with what the command does (the description), then the usage line, the
    options and the examples (the epilog, kept as written)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        description = kwargs.get("description")
        if description and "\n" not in description.strip():  # one paragraph: wrapped here (the raw formatter won't)
            kwargs["description"] = textwrap.fill(description, 110)
        super().__init__(*args, **kwargs)

    def format_help(self) -> str:
        formatter = self._get_formatter()
        formatter.add_text(self.description)
        formatter.add_usage(self.usage, self._actions, self._mutually_exclusive_groups)
        for action_group in self._action_groups:
            formatter.start_section(action_group.title)
            formatter.add_text(action_group.description)
            formatter.add_arguments(action_group._group_actions)
            formatter.end_section()
        formatter.add_text(self.epilog)
        return formatter.format_help()
