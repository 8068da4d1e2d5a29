"""Secrets never enter a config: overrides that name one or carry one are refused before Hydra writes anything,
and whatever text is logged anyway goes through `redact`.

A run writes its config to `.hydra/` (config.yaml, overrides.yaml, hydra.yaml), to every checkpoint (which
`push_to_hub` uploads), to wandb (run name, config, argv) and, in a sweep, into job folder names, final.json and
the report. Tokens belong in the environment (HF_TOKEN, WANDB_API_KEY, ...) or the libraries' cached logins.

What counts as a secret:
- a key whose name says so: a part of it is token, secret, password, passwd, api_key, apikey, access_key,
  private_key or credential(s) (`+hf_token=...`, `+logging.wandb_api_key=...`);
- a value that looks like an access token: Hugging Face (`hf_...`, `api_org_...`), OpenAI / Anthropic style
  (`sk-...`), GitHub (`ghp_...`, `github_pat_...`), AWS access key ids (`AKIA...`), Slack (`xox?-...`), or a
  wandb API key (40 hex digits as a whole value; keys naming a revision / commit / sha may hold one);
- a value that contains the value of a secret environment variable of this process (a variable whose name says
  secret as above, e.g. `${oc.env:HF_TOKEN}` interpolated into a config value).
"""

from __future__ import annotations

import os
import re
from typing import Any, Iterable, Mapping, Optional

from omegaconf import DictConfig, OmegaConf

REDACTED = "<redacted>"
_WORDS = r"token|secret|password|passwd|api_?key|apikey|access_?key|private_?key|credentials?"
SECRET_KEY = re.compile(rf"(?:^|[._-])(?:{_WORDS})(?:$|[._-])", re.IGNORECASE)
_SECRET_ENV = re.compile(rf"(?:^|_)(?:{_WORDS})(?:$|_)", re.IGNORECASE)
_TOKEN_PATTERNS = (
    re.compile(r"(?<![A-Za-z0-9])hf_[A-Za-z0-9]{20,}"),  # Hugging Face user access token
    re.compile(r"(?<![A-Za-z0-9])api_org_[A-Za-z0-9]{20,}"),  # Hugging Face organisation token (legacy)
    re.compile(r"(?<![A-Za-z0-9])sk-(?:[A-Za-z]+-)?[A-Za-z0-9_-]{20,}"),  # OpenAI (sk-, sk-proj-), Anthropic
    re.compile(r"(?<![A-Za-z0-9])(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,})"),  # GitHub
    re.compile(r"(?<![A-Za-z0-9])AKIA[0-9A-Z]{16}(?![A-Za-z0-9])"),  # AWS access key id
    re.compile(r"(?<![A-Za-z0-9])xox[abprs]-[A-Za-z0-9-]{10,}"),  # Slack
)
_WANDB_KEY = re.compile(r"^(?:local-)?[0-9a-f]{40}$")  # a whole value (or one item of a sweep list)
_HEX_ALLOWED_KEY = re.compile(r"revision|commit|sha|hash", re.IGNORECASE)
_MIN_ENV_SECRET = 12  # shorter environment values are too likely to occur by chance


def secret_env_values(environ: Mapping[str, str] = os.environ) -> list[str]:
    """Values of this process's environment variables whose names say they are secrets."""
    return sorted({v for k, v in environ.items() if _SECRET_ENV.search(k) and len(v or "") >= _MIN_ENV_SECRET},
                  key=len, reverse=True)


def key_names_secret(key: str) -> bool:
    """`hf_token`, `logging.wandb_api_key`, `+db.password`: a key part says it holds a secret."""
    return bool(SECRET_KEY.search(key.lstrip("+~")))


def value_looks_secret(value: Any, key: str = "", environ: Mapping[str, str] = os.environ) -> bool:
    """Whether a (string) value looks like an access token or holds a secret environment variable's value."""
    if not isinstance(value, str) or not value:
        return False
    if any(p.search(value) for p in _TOKEN_PATTERNS):
        return True
    if not _HEX_ALLOWED_KEY.search(key):
        items = [v.strip().strip("'\"") for v in re.split(r"[,\[\]()]", value)]
        if any(_WANDB_KEY.match(item) for item in items):
            return True
    return any(secret in value for secret in secret_env_values(environ))


def redact(text: Any, environ: Mapping[str, str] = os.environ) -> Any:
    """`text` with every token-like substring and every secret environment value replaced by <redacted>;
    dicts and lists are redacted item by item (keys that name a secret get their value redacted whole)."""
    if isinstance(text, dict):
        return {k: (REDACTED if key_names_secret(str(k)) and v not in (None, "") else redact(v, environ))
                for k, v in text.items()}
    if isinstance(text, (list, tuple)):
        return type(text)(redact(v, environ) for v in text)
    if not isinstance(text, str):
        return text
    for pattern in _TOKEN_PATTERNS:
        text = pattern.sub(REDACTED, text)
    for secret in secret_env_values(environ):
        text = text.replace(secret, REDACTED)
    return text


def _split(arg: str) -> tuple[Optional[str], str]:
    if arg.startswith("-"):  # --config-dir=..., -cn x: only the value can hold a secret
        return None, arg.split("=", 1)[1] if "=" in arg else arg
    if "=" not in arg:
        return (arg, "") if arg.startswith("~") else (None, arg)
    key, value = arg.split("=", 1)
    return key, value


def secret_override_problems(args: Iterable[str], environ: Mapping[str, str] = os.environ) -> list[str]:
    """Messages (the values redacted) for command-line arguments that name or carry a secret."""
    problems = []
    for arg in args:
        key, value = _split(str(arg))
        shown = redact(f"{key}={value}" if key is not None else value, environ)
        if key is not None and key_names_secret(key):
            problems.append(f"{shown.split('=', 1)[0]}=...: the key names a secret; secrets are never config values "
                            "(the config is saved in .hydra/, in every checkpoint and in the Hub push)")
        elif value_looks_secret(value, key or "", environ):
            name = key if key is not None else "a command-line argument"
            problems.append(f"{redact(name, environ)}: the value looks like an access token ({REDACTED}); secrets are "
                            "never config values (the config is saved in .hydra/, in every checkpoint and in the "
                            "Hub push)")
    return problems


ENV_HINT = ("pass secrets through the environment instead: HF_TOKEN (or `huggingface-cli login`) for the Hub, "
            "WANDB_API_KEY (or `wandb login`) for wandb; medsft reads neither from the config")


def _leaves(node: Any, prefix: str = "") -> Iterable[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, f"{prefix}{key}.")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _leaves(value, f"{prefix}{index}.")
    else:
        yield prefix[:-1], node


def secret_config_problems(cfg: DictConfig | Mapping, environ: Mapping[str, str] = os.environ) -> list[str]:
    """Keys of a composed config (resolved: `${oc.env:HF_TOKEN}` counts) whose value is a secret."""
    try:
        data = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False) if isinstance(cfg, DictConfig) \
            else dict(cfg)
    except Exception:  # noqa: BLE001 - an interpolation that does not resolve is reported by its own check
        data = OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, DictConfig) else dict(cfg)
    return [f"{key}: the value is a secret ({REDACTED}); {ENV_HINT}"
            for key, value in _leaves(data) if value_looks_secret(value, key, environ)]
