"""A composed config as plain data: for saving, wandb, and comparing two runs key by key."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf


def to_plain_dict(cfg: DictConfig) -> dict:
    """The resolved config as plain data (for saving, wandb); holds no secrets by construction."""
    data = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    data.pop("defaults", None)
    return data


def flatten(data: Any, prefix: str = "") -> dict:
    """A nested dict as {"dotted.key": leaf}; lists are leaves."""
    if isinstance(data, dict):
        out: dict = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: data}
