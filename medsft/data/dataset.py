"""From `data.*` config and a tokenizer to train/validation examples, tokenized once and cached on disk.

Order of operations (all seeded, so every rank of a distributed run builds the same split):
  1. load + validate the whole file (`load_records`; DataError before any tokenization);
  2. seeded shuffle (data.shuffle), then max_samples (a random subset when shuffled, else the first N);
  3. validation split: data.val_path (a separate file) or the last round(n * data.val_ratio) records;
     training records identical to a validation record are removed from training (counted), so the
     validation loss is not measured on trained-on text;
  4. render + tokenize the selected records (batched, progress bar), or reuse the cache;
  5. apply data.overlong (drop | truncate | error) at data.max_seq_len and build labels.

Cache: one .npz per (file content, selected records, tokenizer, chat template, response template, system
prompt, field map, format version) under data.cache_dir, else $MEDSFT_CACHE/data, else ~/.cache/medsft/data.
`data_cfg` everywhere here is the typed `data` node (medsft.config.schema.DataConfig, values from conf/data/).
It holds the token ids of each rendered conversation with its prompt length and loss end, i.e. everything
before the length policy: max_seq_len and overlong are applied after loading (a few ms), so changing them, the
seed's split, or val_ratio reuses the same tokenization. Written atomically (temp file + rename), so
concurrent ranks or an interrupted run never leave a half-written entry.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import io
import json
import logging
import os
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from importlib.metadata import version

import numpy as np
from tqdm.auto import tqdm

from medsft.data.records import LoadReport, Record, load_records, records_key
from medsft.data.render import Rendered, apply_length_policy, ensure_chat_template, render_records
from medsft.errors import DataError
from medsft.paths import cache_home, in_project

log = logging.getLogger(__name__)

# Bump when rendering or the cache layout changes: old entries are then ignored.
FORMAT_VERSION = 1
RENDER_CHUNK = 1024  # records per batched tokenizer call (progress bar granularity)


@dataclass
class SFTData:
    train: list[dict]  # {"input_ids": list[int], "labels": list[int]}
    val: Optional[list[dict]]  # same, or None without a validation split
    val_records: list[Record]  # the held-out records (all of them; for the generation check)
    stats: dict = field(default_factory=dict)
    report: Optional[LoadReport] = None  # the training file's load report


def resolve_data_path(path: Any, what: str = "data.path") -> str:
    """A data path as given (relative to the cwd), else relative to the project (bundled data)."""
    if path is None or str(path) in ("", "???"):
        raise DataError(f"{what} is not set; pass {what}=/path/to/records.json (or .jsonl)")
    return str(in_project(path))


def cache_root(data_cfg: Any) -> Path:
    """Where tokenized data is cached: data.cache_dir, else $MEDSFT_CACHE/data (or ~/.cache/medsft/data)."""
    if data_cfg.cache_dir:
        return Path(os.path.expanduser(str(data_cfg.cache_dir)))
    return cache_home() / "data"


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Identity of a tokenizer for cache keys: name, full vocabulary/merges/normalizer, chat template, specials."""
    h = hashlib.blake2b(digest_size=16)
    h.update(str(getattr(tokenizer, "name_or_path", "")).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # slow tokenizer
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps(getattr(tokenizer, "chat_template", None), sort_keys=True, default=str).encode())
    h.update(json.dumps(getattr(tokenizer, "special_tokens_map", {}), sort_keys=True, default=str).encode())
    h.update(f"{version('transformers')}/{version('tokenizers')}".encode())
    return h.hexdigest()


def _fields(data_cfg: Any) -> dict:
    return {k: data_cfg.fields[k] for k in ("question", "reasoning", "response", "source")}


def _cache_key(report: LoadReport, records: Sequence[Record], tok_fp: str, cfg: Any) -> str:
    parts = {
        "v": FORMAT_VERSION,
        "file": report.content_hash,
        "selection": records_key(records),
        "n": len(records),
        "tokenizer": tok_fp,
        "response_template": cfg.response_template,
        "system_prompt": cfg.system_prompt,
        "fields": _fields(cfg),
    }
    return hashlib.blake2b(json.dumps(parts, sort_keys=True).encode(), digest_size=16).hexdigest()


def _save(path: Path, records: Sequence[Record], rendered: Sequence[Rendered]) -> None:
    lengths = np.fromiter((len(r.ids) for r in rendered), dtype=np.int64, count=len(rendered))
    offsets = np.zeros(len(rendered) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.fromiter((t for r in rendered for t in r.ids), dtype=np.int32, count=int(offsets[-1]))
    buf = io.BytesIO()
    np.savez(
        buf,
        ids=flat,
        offsets=offsets,
        prompt_len=np.array([r.prompt_len for r in rendered], dtype=np.int32),
        loss_end=np.array([r.loss_end for r in rendered], dtype=np.int32),
        index=np.array([r.index for r in records], dtype=np.int64),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(buf.getbuffer())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _load(path: Path, records: Sequence[Record]) -> Optional[list[Rendered]]:
    try:
        with np.load(path) as z:
            index, flat, offsets = z["index"], z["ids"], z["offsets"]
            prompt_len, loss_end = z["prompt_len"].tolist(), z["loss_end"].tolist()
    except Exception as err:  # corrupt or foreign file: rebuild
        log.warning("ignoring unreadable data cache %s (%s); rebuilding", path, err)
        return None
    if len(index) != len(records) or index.tolist() != [r.index for r in records]:
        return None
    ids = flat.tolist()
    bounds = offsets.tolist()
    return [Rendered(ids[bounds[i] : bounds[i + 1]], prompt_len[i], loss_end[i]) for i in range(len(records))]


@contextlib.contextmanager
def _gc_paused():
    """Millions of small int lists trigger repeated full GC passes (~10% of build time); they hold no cycles."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _render_all(
    tokenizer: Any, records: Sequence[Record], cfg: Any, desc: str, progress: Optional[bool]
) -> list[Rendered]:
    template, system_prompt = cfg.response_template, cfg.system_prompt
    out: list[Rendered] = []
    disable = None if progress is None else not progress
    with tqdm(total=len(records), desc=desc, unit="rec", disable=disable, leave=False) as bar:
        for start in range(0, len(records), RENDER_CHUNK):
            chunk = records[start : start + RENDER_CHUNK]
            out.extend(render_records(tokenizer, chunk, template, system_prompt))
            bar.update(len(chunk))
    return out


def tokenize_records(
    tokenizer: Any,
    records: Sequence[Record],
    report: LoadReport,
    cfg: Any,
    use_cache: bool = True,
    progress: Optional[bool] = None,
    info: Optional[dict] = None,
) -> list[Rendered]:
    """Rendered conversations for `records` (all from `report.path`), from the cache or freshly tokenized."""
    if not records:
        return []
    ordered = sorted(records, key=lambda r: r.index)
    path = None
    if use_cache:
        key = _cache_key(report, ordered, tokenizer_fingerprint(tokenizer), cfg)
        path = cache_root(cfg) / f"{key}.npz"
        if info is not None:
            info["cache_path"] = str(path)
        if path.exists():
            cached = _load(path, ordered)
            if cached is not None:
                if info is not None:
                    info["cache"] = "hit"
                by_index = {r.index: x for r, x in zip(ordered, cached)}
                return [by_index[r.index] for r in records]
    rendered = _render_all(tokenizer, ordered, cfg, f"tokenizing {os.path.basename(report.path)}", progress)
    if info is not None:
        info["cache"] = "miss" if use_cache else "off"
    if path is not None:
        try:
            _save(path, ordered, rendered)
        except OSError as err:  # read-only or full disk: training still works, just not cached
            log.warning("could not write the data cache %s: %s", path, err)
    by_index = {r.index: x for r, x in zip(ordered, rendered)}
    return [by_index[r.index] for r in records]


def _examples(
    rendered: Sequence[Rendered], records: Sequence[Record], max_len: int, overlong: str, stats: dict, prefix: str
) -> list[dict]:
    counts = {"truncated": 0, "dropped_overlong": 0, "dropped_prompt_too_long": 0}
    out = []
    tokens = loss_tokens = longest = 0
    for r, rec in zip(rendered, records):
        res = apply_length_policy(r, max_len, overlong, rec)
        if res.status != "ok":
            counts[res.status] += 1
        if res.example is None:
            continue
        ex = res.example
        n = len(ex["input_ids"])
        tokens += n
        longest = max(longest, n)
        loss_tokens += min(r.loss_end, n) - r.prompt_len
        out.append(ex)
    for k, v in counts.items():
        stats[prefix + k] = v
    stats[prefix + "examples"] = len(out)
    stats[prefix + "tokens"] = tokens
    stats[prefix + "loss_tokens"] = loss_tokens
    stats[prefix + "max_len"] = longest
    stats[prefix + "mean_len"] = round(tokens / len(out), 1) if out else 0.0
    return out


def build_sft_data(
    data_cfg: Any,
    tokenizer: Any,
    seed: int,
    max_samples: Optional[int] = None,
    use_cache: bool = True,
    progress: Optional[bool] = None,
) -> SFTData:
    """Validated, split, tokenized and masked training (and validation) examples for `data_cfg`.

    max_samples overrides data.max_samples when given (0 or None = all). The train list is shuffled once by
    `seed` (when data.shuffle); per-epoch shuffling is the training loop's job.
    """
    t0 = time.perf_counter()
    ensure_chat_template(tokenizer)
    fields = data_cfg.fields
    on_invalid, fmt = data_cfg.on_invalid, data_cfg.format
    max_len, overlong = int(data_cfg.max_seq_len), data_cfg.overlong
    if overlong not in ("drop", "truncate", "error"):
        raise DataError(f"data.overlong={overlong!r} is not one of ['drop', 'truncate', 'error']")
    path = resolve_data_path(data_cfg.path)
    records, report = load_records(path, fields, on_invalid=on_invalid, fmt=fmt)
    log.info("%s", report.summary())

    order = list(records)
    if data_cfg.shuffle:
        random.Random(seed).shuffle(order)
    cap = max_samples if max_samples is not None else data_cfg.max_samples
    if cap and cap > 0:
        order = order[:cap]

    stats: dict[str, Any] = {
        "records": report.total,
        "kept": report.kept,
        "invalid": len(report.invalid),
        "invalid_skipped": len(report.invalid),  # only non-zero under data.on_invalid=skip
        "duplicates": report.duplicates,
        "extra_fields": dict(report.extra_fields),
        "content_hash": report.content_hash,
        "selected": len(order),
    }
    val_path = data_cfg.val_path
    val_ratio = float(data_cfg.val_ratio)
    val_records: list[Record] = []
    val_report = None
    if val_path:
        if val_ratio > 0:
            log.warning("data.val_path is set: data.val_ratio=%s is ignored", val_ratio)
        val_records, val_report = load_records(resolve_data_path(val_path, "data.val_path"), fields, on_invalid, fmt)
        stats["val_content_hash"] = val_report.content_hash
        train_records = order
    elif val_ratio > 0:
        n_val = max(1, round(len(order) * val_ratio))
        if n_val >= len(order):
            raise DataError(
                f"data.val_ratio={val_ratio} leaves no training records out of {len(order)}; lower it or add data"
            )
        train_records, val_records = order[:-n_val], order[-n_val:]
    else:
        train_records = order
    if val_records:
        held = {r.key() for r in val_records}
        before = len(train_records)
        train_records = [r for r in train_records if r.key() not in held]
        overlap = before - len(train_records)
        stats["val_overlap_dropped"] = overlap
        if overlap:
            log.warning("%d training records duplicate a validation record; removed from training", overlap)
        if not train_records:
            raise DataError(f"{path}: every training record is also a validation record")

    # One tokenization (and cache entry) for every selected record of the file, whatever the split, so
    # another seed or val_ratio reuses it; a separate val_path file has its own entry.
    info: dict[str, Any] = {}
    with _gc_paused():
        from_file = order if not val_path else train_records
        by_index = dict(zip((r.index for r in from_file),
                            tokenize_records(tokenizer, from_file, report, data_cfg, use_cache, progress, info)))
        train = _examples([by_index[r.index] for r in train_records], train_records, max_len, overlong, stats, "")
        val = None
        if val_records:
            if val_path:
                v_rendered = tokenize_records(tokenizer, val_records, val_report, data_cfg, use_cache, progress, {})
            else:
                v_rendered = [by_index[r.index] for r in val_records]
            val = _examples(v_rendered, val_records, max_len, overlong, stats, "val_")
            stats["val_records"] = len(val_records)
        del by_index
    stats["train_records"] = len(train_records)
    stats["cache"] = info.get("cache", "off")
    if "cache_path" in info:
        stats["cache_path"] = info["cache_path"]
    if not train:
        raise DataError(
            f"{path}: no training example fits data.max_seq_len={max_len}: "
            f"{stats['dropped_overlong']} dropped as over-long, {stats['dropped_prompt_too_long']} with a prompt "
            "alone over the limit; raise data.max_seq_len or set data.overlong=truncate"
        )
    dropped = stats["dropped_overlong"] + stats["dropped_prompt_too_long"]
    if dropped or stats["truncated"]:
        log.warning(
            "%s: %d of %d training examples over data.max_seq_len=%d: %d dropped (%d with the prompt alone over "
            "it), %d truncated",
            path, dropped + stats["truncated"], len(train_records), max_len, dropped,
            stats["dropped_prompt_too_long"], stats["truncated"],
        )
    stats["seconds"] = round(time.perf_counter() - t0, 3)
    log.info(
        "data: %d train examples (%d tokens, %d with loss)%s; %s in %.2fs (cache %s)",
        len(train), stats["tokens"], stats["loss_tokens"],
        f", {len(val)} validation examples" if val is not None else "", path, stats["seconds"], stats["cache"],
    )
    return SFTData(train=train, val=val, val_records=val_records, stats=stats, report=report)
