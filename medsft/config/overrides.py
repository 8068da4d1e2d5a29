"""Command-line overrides checked before Hydra composes (or writes) anything: secrets are refused (secrets.py),
and a key that is not in the schema names the allowed keys and a likely correction (Hydra's own message does
neither, and `+key=value` would add it to the config)."""

from __future__ import annotations

import dataclasses
import difflib
import sys
from typing import Any

from medsft.config.schema import SCHEMA_TYPES, Config
from medsft.config.secrets import ENV_HINT, secret_override_problems
from medsft.errors import ConfigError
from medsft.paths import CONF_DIR


def unknown_override_keys(args: list[str]) -> list[str]:
    """Messages for `key=value` / `+key=value` / `++key=value` command-line overrides whose key is not in the
    schema.

    This check runs first (before Hydra composes anything): Hydra rejects a plain unknown key without naming the
    allowed ones or a likely correction, and accepts an appended one (`+optimizer.lrr=1`) as a new config key.
    Group selections (`model=tiny_random`, `+experiment=x`), deletions (`~x`), `hydra.*`, package overrides
    (`a@b=...`) and free-form subtrees (`rl.*`, typed when its group is selected) are left to Hydra.
    """
    messages = []
    for arg in args:
        if arg.startswith(("-", "~")) or "=" not in arg:
            continue
        key = arg.split("=", 1)[0].lstrip("+")
        if key.startswith("hydra.") or key == "hydra" or "/" in key or "@" in key or _is_group_name(key):
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


def override_problems(args: list[str]) -> list[str]:
    """Every problem of a command line: secrets first (their messages never show the value), then unknown keys."""
    secrets = secret_override_problems(args)
    if secrets:
        return [*secrets, ENV_HINT]
    return unknown_override_keys(args)


def check_cli_overrides(args: list[str]) -> None:
    """Exit with code 2 and a clear message when a command-line argument carries a secret or an override names
    an unknown key. Runs before Hydra, so nothing (.hydra/, a sweep folder) has been written yet."""
    messages = override_problems(list(args))
    if messages:
        print("medsft: error: " + "\n  ".join(messages), file=sys.stderr, flush=True)
        sys.exit(ConfigError.exit_code)
