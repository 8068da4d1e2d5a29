"""Sources of a run and how they mix: `data.path` alone (one source), or `data.mixture` (several, each with its own
format, field map and a weight or a count).

A key a mixture source leaves out is the one of `data` (format, file_type, fields, split, subset, revision,
val_ratio). Each source is validated, split into train/validation (seeded, per source) and tokenized on its own;
then the training examples are drawn from each:
  * weights: shares of the training set; the set is the largest that repeats no example (the source that runs
    out first is taken whole, the others a seeded subset of the size its share asks for);
  * counts: that many examples from each source, a seeded subset (all of them, repeated, when the count is larger
    than the source).
Validation examples are every source's held-out examples, unweighted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from medsft.data.formats import FormatOptions, check_format_name
from medsft.data.sources import SourceSpec

log = logging.getLogger(__name__)

_FIELD_KEYS = ("question", "reasoning", "response", "source")


@dataclass(frozen=True)
class SourceConfig:
    """One source of the run, every key resolved (its own, else `data`'s)."""

    name: str
    position: int  # in data.mixture (0 for data.path)
    spec: SourceSpec
    format: str
    options: FormatOptions
    val_ratio: float
    weight: Optional[float] = None
    count: Optional[int] = None
    key: str = "data"  # the config key it came from, for messages: data or data.mixture[i]


def _get(node: Any, key: str) -> Any:
    return node.get(key) if hasattr(node, "get") else getattr(node, key, None)


def top_level_options(data_cfg: Any) -> FormatOptions:
    """The field map and layout of `data` itself (data.path, data.val_path)."""
    return FormatOptions.of({k: data_cfg.fields[k] for k in _FIELD_KEYS}, data_cfg.response_template)


def source_configs(data_cfg: Any, hf_cache_dir: Optional[str] = None) -> list[SourceConfig]:
    """The run's sources: data.mixture when it lists any, else data.path."""
    mixture = list(_get(data_cfg, "mixture") or [])
    template = data_cfg.response_template
    base_fields = {k: data_cfg.fields[k] for k in _FIELD_KEYS}
    if not mixture:
        check_format_name(data_cfg.format)
        spec = SourceSpec(data_cfg.path, data_cfg.file_type, data_cfg.split, data_cfg.subset, data_cfg.revision,
                          hf_cache_dir, "data.path")
        name = _get(data_cfg, "name") or (Path(str(data_cfg.path)).stem if data_cfg.path else "data")
        return [SourceConfig(str(name), 0, spec, data_cfg.format, FormatOptions.of(base_fields, template),
                             float(data_cfg.val_ratio))]
    if data_cfg.path:
        log.warning("data.mixture lists %d sources: data.path=%s is not used", len(mixture), data_cfg.path)
    out, names = [], set()
    for i, src in enumerate(mixture):
        key = f"data.mixture[{i}]"

        def own(k: str, default: Any) -> Any:
            value = _get(src, k)
            return default if value is None else value

        fmt = own("format", data_cfg.format)
        check_format_name(fmt, f"{key}.format")
        fields = dict(base_fields)
        fields.update({k: v for k, v in dict(own("fields", {})).items() if v is not None or k == "source"})
        path = _get(src, "path")
        spec = SourceSpec(path, own("file_type", data_cfg.file_type), own("split", data_cfg.split),
                          own("subset", data_cfg.subset), own("revision", data_cfg.revision), hf_cache_dir,
                          f"{key}.path")
        name = str(own("name", Path(str(path)).stem or f"source{i}"))
        while name in names:
            name += f"_{i}"
        names.add(name)
        weight, count = _get(src, "weight"), _get(src, "count")
        out.append(SourceConfig(name, i, spec, fmt, FormatOptions.of(fields, template, f"{key}.fields"),
                                float(own("val_ratio", data_cfg.val_ratio)),
                                None if weight is None else float(weight), None if count is None else int(count),
                                key))
    return out


def draw_counts(sources: list[SourceConfig], available: list[int]) -> list[int]:
    """How many training examples each source contributes (see the module docstring)."""
    if len(sources) == 1 and sources[0].weight is None and sources[0].count is None:
        return list(available)
    if all(s.count is not None for s in sources):
        return [int(s.count) for s in sources]
    weights = np.array([float(s.weight) for s in sources], dtype=np.float64)
    shares = weights / weights.sum()
    sizes = np.asarray(available, dtype=np.float64)
    if (sizes == 0).any():
        return [0] * len(sources)
    total = float(np.min(sizes / shares))
    counts = np.minimum(np.floor(shares * total + 1e-9).astype(np.int64), sizes.astype(np.int64))
    return [int(c) for c in counts]


def draw(n_available: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """k positions out of n: a seeded subset when k <= n, else every one k // n times plus a seeded rest."""
    if k <= n_available:
        return np.sort(rng.permutation(n_available)[:k]) if k < n_available else np.arange(n_available)
    full = np.tile(np.arange(n_available), k // n_available)
    rest = np.sort(rng.permutation(n_available)[: k % n_available])
    return np.concatenate([full, rest])


def data_record(stats: dict) -> dict:
    """The `metrics.jsonl` record of the run's data ("kind": "data"): totals and every source's share."""
    keys = ("records", "kept", "invalid", "duplicates", "train_records", "examples", "tokens", "loss_tokens",
            "val_examples", "val_tokens", "dropped_overlong", "dropped_prompt_too_long", "truncated", "content_hash",
            "cache")
    return {"kind": "data", **{k: stats[k] for k in keys if k in stats}, "sources": stats.get("sources", [])}


def log_sources(sources_stats: list[dict]) -> None:
    if len(sources_stats) < 2:
        return
    total = sum(s["train_examples"] for s in sources_stats) or 1
    parts = [f"{s['name']} {s['train_examples']} of {s['train_available']} examples ({100 * s['train_examples'] / total:.1f}%"
             f", {s['train_tokens']:,} tokens)" for s in sources_stats]
    log.info("data mixture: %s", "; ".join(parts))
