"""The checks of the `data` group Hydra cannot express: the record format (data.format, which once named the file
type: an old value says where it moved) and every source of data.mixture (its keys, its share, its values).
Called by `medsft.config.validation.validate`; the values allowed are the ones medsft.data reads."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

# data.format names the record format (medsft.data.formats); the file type is data.file_type.
RECORD_FORMATS = ("auto", "medsft", "huatuo", "messages", "sharegpt", "alpaca")
FILE_TYPES = ("auto", "json", "jsonl", "parquet", "arrow")
# What a data.mixture source may say (a key it leaves out is the one of `data`).
DATA_SOURCE_KEYS = ("name", "path", "weight", "count", "format", "file_type", "fields", "split", "subset", "revision",
                    "val_ratio")


def _format_problem(key: str, value: Any) -> list[str]:
    if value in RECORD_FORMATS:
        return []
    if value in FILE_TYPES:
        file_key = key.rsplit(".", 1)[0] + ".file_type"
        return [f"{key}={value!r} is a file type: {key} now names the record format ({' | '.join(RECORD_FORMATS)}) "
                f"and the file type moved to {file_key}; use {file_key}={value}"]
    return [f"{key}={value!r} is not one of {list(RECORD_FORMATS)}"]


def data_problems(data: Any) -> list[str]:
    """The record format, and every source of data.mixture: its keys, share and values."""
    problems = _format_problem("data.format", data.format)
    mixture = list(data.mixture or [])  # when it lists sources, data.path is not used (the loader says so)
    shares = set()
    for i, src in enumerate(mixture):
        key = f"data.mixture[{i}]"
        if not isinstance(src, (dict, DictConfig)):
            problems.append(f"{key} must be a mapping like {{path: train.json, weight: 0.5}}")
            continue
        unknown = sorted(set(src) - set(DATA_SOURCE_KEYS))
        if unknown:
            problems.append(f"{key} has unknown key(s) {unknown} (allowed: {', '.join(DATA_SOURCE_KEYS)})")
        if not src.get("path"):
            problems.append(f"{key}.path is not set")
        has_weight, has_count = src.get("weight") is not None, src.get("count") is not None
        if has_weight == has_count:
            problems.append(f"{key} needs exactly one of weight (a share) or count (a number of examples)")
        shares.add("weight" if has_weight else "count" if has_count else None)
        if has_weight and not (isinstance(src["weight"], (int, float)) and src["weight"] > 0):
            problems.append(f"{key}.weight={src['weight']!r} must be a number > 0")
        if has_count and not (isinstance(src["count"], int) and not isinstance(src["count"], bool)
                              and src["count"] >= 1):
            problems.append(f"{key}.count={src['count']!r} must be an integer >= 1")
        if src.get("format") is not None:
            problems += _format_problem(f"{key}.format", src["format"])
        if src.get("file_type") is not None and src["file_type"] not in FILE_TYPES:
            problems.append(f"{key}.file_type={src['file_type']!r} is not one of {list(FILE_TYPES)}")
        if src.get("val_ratio") is not None and not (isinstance(src["val_ratio"], (int, float))
                                                     and 0.0 <= src["val_ratio"] < 1.0):
            problems.append(f"{key}.val_ratio={src['val_ratio']!r} must be in [0, 1)")
        fields = src.get("fields")
        if fields is not None:
            if not isinstance(fields, (dict, DictConfig)):
                problems.append(f"{key}.fields must be a mapping of question/reasoning/response/source")
            else:
                bad = sorted(set(fields) - {"question", "reasoning", "response", "source"})
                if bad:
                    problems.append(f"{key}.fields has unknown key(s) {bad} (question, reasoning, response, source)")
    if len(shares - {None}) > 1:
        problems.append("data.mixture mixes weights and counts: give every source a weight, or every source a count")
    names = [str(s.get("name")) for s in mixture if isinstance(s, (dict, DictConfig)) and s.get("name")]
    if len(set(names)) != len(names):
        problems.append(f"data.mixture names a source twice ({names})")
    if not mixture and not data.path:
        problems.append("data.path is not set: pass data.path=/path/to/train.jsonl, or data=mixture "
                        "'data.mixture=[{path: a.json, weight: 0.7}, {path: b.jsonl, weight: 0.3}]'")
    return problems
