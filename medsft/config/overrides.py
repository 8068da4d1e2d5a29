"""Command-line overrides checked against the schema before Hydra composes anything, so a typo names the
allowed keys and a likely correction (Hydra's own message does neither)."""

from __future__ import annotations

import dataclasses
import difflib
import sys
from typing import Any

from medsft.config.schema import SCHEMA_TYPES, Config
from medsft.errors import ConfigError
from medsft.paths import CONF_DIR


def unknown_override_keys(args: list[str]) -> list[str]:
    """Messages for `key=value` command-line overrides whose key is not in the schema.

    Hydra rejects them too, but names neither the allowed keys nor a likely correction; this check runs
    first (before Hydra composes anything) and does both. Group selections (`model=tiny_random`), appends
    (`+x=`), deletions (`~x`), `hydra.*` and free-form subtrees (`rl.*`) are left to Hydra.
    """
    messages = []
    for arg in args:
        if arg.startswith(("-", "+", "~")) or "=" not in arg:
            continue
        key = arg.split("=", 1)[0]
        if key.startswith("hydra.") or key == "hydra" or "/" in key or _is_group_name(key):
            continue
        node: Any = Config
        path = []
        for part in key.split("."):
            if not (isinstance(node, type) and dataclasses.is_dataclass(node)):
                break  # below a free-form (Any / dict) node: nothing to check
            fields = {f.name: f for f in dataclasses.fields(node) if f.name != "defaults"}
            if part not in fields:
                where = ".".join(path) or "the top level"
                close = difflib.get_close_matches(part, fields, n=1)
                hint = f" (did you mean {'.'.join([*path, close[0]])}?)" if close else ""
                messages.append(f"unknown config key {key!r}{hint}; keys of {where}: {', '.join(sorted(fields))}")
                break
            path.append(part)
            field_type = fields[part].type
            node = SCHEMA_TYPES.get(field_type, field_type) if isinstance(field_type, str) else field_type
    return messages


def _is_group_name(key: str) -> bool:
    """`experiment=...`, `train=...`: config groups (folders of conf/) selected by name."""
    return "." not in key and (CONF_DIR / key).is_dir()


def check_cli_overrides(args: list[str]) -> None:
    """Exit with code 2 and a clear message when a command-line override names an unknown key."""
    messages = unknown_override_keys(args)
    if messages:
        print("medsft: error: " + "\n  ".join(messages), file=sys.stderr)
        sys.exit(ConfigError.exit_code)
