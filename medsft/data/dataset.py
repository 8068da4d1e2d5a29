"""From `data.*` config and a tokenizer to train/validation examples, tokenized once and cached on disk.

Order of operations, per source (data.path, or each source of data.mixture; all seeded, so every rank of a
distributed run builds the same split):
  1. read + validate every record (`medsft.data.records.scan`, streaming; a DataError before any example is
     used; a large file's records are already being tokenized meanwhile, see `_pipeline_for`);
  2. seeded shuffle (data.shuffle), then max_samples (a random subset when shuffled, else the first N);
  3. validation split: data.val_path (a separate file) or the last round(n * val_ratio) records; training records
     identical to a validation record are removed from training (counted), so the validation loss is not
     measured on trained-on text;
  4. render + tokenize the selected records in parallel (data.num_proc) into a token store, or map the cached
     one; a record longer in characters than max_seq_len tokens can be is never tokenized whole;
  5. apply data.overlong (drop | truncate | error) at data.max_seq_len;
then the sources are mixed (medsft.data.mixture: weights or counts).

Cache: one token store file (medsft.data.store) per (source content, selected records, tokenizer, chat template,
response template, system prompt, record format and field map, format version) under data.cache_dir, else
$MEDSFT_CACHE/data, else ~/.cache/medsft/data. Every process maps it (numpy memmap) instead of holding the tokens
as Python lists. It holds the token ids of each rendered conversation with its loss spans, i.e. everything
before the length policy: max_seq_len, overlong, loss_turns, the split and the mixture are applied after loading
(a few ms), so changing them reuses the same tokenization. Written atomically (temp file + rename), so
concurrent ranks or an interrupted run never leave a half-written entry. `hints/` notes which entry a file (by
path, size and mtime) last gave, so a run that will hit the cache does not tokenize while it validates.
`data_cfg` everywhere here is the typed `data` node (medsft.config.schema.DataConfig, values from conf/data/).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any, Optional

import numpy as np

from medsft.data.base import LoadReport, Record
from medsft.data.mixture import SourceConfig, draw, draw_counts, log_sources, source_configs, top_level_options
from medsft.data.records import Scan, indices_key, scan
from medsft.data.render import OVERLONG, ensure_chat_template, length_error, render_records
from medsft.data.sources import Source, SourceSpec, open_source
from medsft.data.store import Examples, StoreWriter, TokenStore, id_dtype
from medsft.data import tokenize as tokenizing
from medsft.data.tokenize import RenderJob, char_bound, pack, render_chunks, truncated_prefix
from medsft.errors import DataError
from medsft.paths import cache_home, in_project

log = logging.getLogger(__name__)

# Bump when rendering or the cache layout changes: old entries are then ignored.
FORMAT_VERSION = 2
SPECULATE_BYTES = 16 << 20  # local files this large start tokenizing while they are validated
_MARGIN_TOKENS = 64  # a truncated prefix is cut this many tokens' worth of characters past max_seq_len


@dataclass
class SFTData:
    train: Examples  # example i: {"input_ids": list[int], "labels": list[int]} (built from the mapped store)
    val: Optional[Examples]  # same, or None without a validation split
    val_records: list[Record]  # the held-out records (all of them; for the generation check)
    stats: dict = field(default_factory=dict)
    report: Optional[LoadReport] = None  # the (first) training source's load report


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


def _cache_key(content_hash: str, indices: np.ndarray, tok_fp: str, cfg: Any, sc: SourceConfig, fmt: str) -> str:
    o = sc.options
    parts = {
        "v": FORMAT_VERSION,
        "file": content_hash,
        "selection": indices_key(indices),
        "n": int(len(indices)),
        "tokenizer": tok_fp,
        "response_template": cfg.response_template,
        "system_prompt": cfg.system_prompt,
        "format": fmt,
        "fields": [o.question, o.reasoning, o.response, o.source] if fmt == "medsft" else None,
    }
    return hashlib.blake2b(json.dumps(parts, sort_keys=True).encode(), digest_size=16).hexdigest()


# ----------------------------------------------------------------------------------------------- one source


@dataclass
class Tokenized:
    """A source's selected records, tokenized: `store` holds the records within the character bound (rows in
    source order), `over` the positions (in the scan) of those beyond it (never tokenized whole)."""

    scan: Scan
    store: TokenStore
    row_of: np.ndarray  # scan position -> store row (-1: not in the store)
    over: np.ndarray  # scan positions over the character bound
    info: dict
    bound: Optional[int] = None  # the character bound it was built with (None: no bound for this tokenizer)


def open_scanned(sc: SourceConfig, data_cfg: Any, source: Optional[Source] = None, sink: Any = None) -> Scan:
    """Open and validate one source (medsft.data.records.scan); logs its load report."""
    source = source or open_source(sc.spec)
    stamp = source.stamp()
    result = scan(source, sc.format, sc.options, data_cfg.on_invalid, data_cfg.headers_in_text, key=sc.key,
                  sink=sink)
    result.report.content_hash = source.content_hash
    result.stamp = stamp
    log.info("%s", result.report.summary())
    return result


def _hint_path(sc: SourceConfig, data_cfg: Any, tok_fp: str, bound: Optional[int], source: Source) -> Optional[Path]:
    """Where the cache key last built for this file (as it is now) and these settings is noted, so a run that
    will find its entry in the cache does not start tokenizing while it validates (see `_pipeline_for`)."""
    stamp = source.stamp()
    if stamp is None:
        return None
    o = sc.options
    parts = [FORMAT_VERSION, os.path.abspath(source.path), list(stamp), tok_fp, data_cfg.response_template,
             data_cfg.system_prompt, sc.format, [o.question, o.reasoning, o.response, o.source],
             data_cfg.headers_in_text, data_cfg.on_invalid, bound]
    key = hashlib.blake2b(json.dumps(parts, default=str).encode(), digest_size=16).hexdigest()
    return cache_root(data_cfg) / "hints" / key


def _note_hint(hint: Optional[Path], key: str) -> None:
    if hint is None:
        return
    try:
        hint.parent.mkdir(parents=True, exist_ok=True)
        hint.write_text(key, encoding="utf-8")
    except OSError:  # a hint only saves work; a cache folder that cannot take it is no error
        pass


def _pipeline_for(sc: SourceConfig, data_cfg: Any, tokenizer: Any, source: Source, selects_all: bool,
                  use_cache: bool, bound: Optional[int], tok_fp: str,
                  progress: Optional[bool]) -> Optional[tokenizing.Pipeline]:
    """Workers that tokenize while the source is validated, when that pays: a large local file whose every valid
    record is selected (no data.max_samples, no val_path), several workers, and no cache entry noted for it."""
    stamp = source.stamp()
    if not (use_cache and selects_all and stamp is not None and stamp[0] >= SPECULATE_BYTES):
        return None
    workers = tokenizing.workers_for(int(data_cfg.num_proc), 1 << 30)
    if workers <= 1:
        return None
    hint = _hint_path(sc, data_cfg, tok_fp, bound, source)
    if hint is not None and hint.exists():
        with contextlib.suppress(OSError):
            if (cache_root(data_cfg) / f"{hint.read_text(encoding='utf-8').strip()}.tok").exists():
                return None  # most likely a cache hit: validate first
    writer = StoreWriter(cache_root(data_cfg) / "building.tok", ids_dtype=id_dtype(len(tokenizer)))
    return tokenizing.Pipeline(tokenizer, source, data_cfg.response_template, data_cfg.system_prompt, workers,
                               writer, bound, f"tokenizing {os.path.basename(source.path)}", progress)


def tokenize_scan(tokenizer: Any, sc: SourceConfig, data_cfg: Any, result: Scan, positions: np.ndarray,
                  use_cache: bool, progress: Optional[bool], bound: Optional[int], tok_fp: str,
                  pipeline: Optional[tokenizing.Pipeline] = None) -> Tokenized:
    """Tokenize the records at these scan positions (or map their cache entry). `pipeline`: workers that have
    been tokenizing every valid record within the bound while the source was validated (`_pipeline_for`)."""
    positions = np.unique(np.asarray(positions, dtype=np.int64))
    over = positions[result.chars[positions] > bound] if bound is not None else positions[:0]
    inside = positions if not len(over) else np.setdiff1d(positions, over, assume_unique=True)
    row_of = np.full(len(result), -1, dtype=np.int64)
    row_of[inside] = np.arange(len(inside))
    indices = result.index[inside]
    info: dict[str, Any] = {"cache": "off"}
    path = None
    fmt = result.report.record_format
    if use_cache:
        key = _cache_key(result.report.content_hash, indices, tok_fp, data_cfg, sc, fmt)
        path = cache_root(data_cfg) / f"{key}.tok"
        info["cache_path"] = str(path)
        hint = _hint_path(sc, data_cfg, tok_fp, bound, result.source)
        if path.exists():
            store = TokenStore.open(path)
            if store is not None and len(store) == len(indices) and np.array_equal(store.index, indices):
                info["cache"] = "hit"
                if pipeline is not None:  # tokenized for nothing: the entry was there after all
                    pipeline.abort()
                    pipeline.writer.abort()
                _note_hint(hint, key)
                return Tokenized(result, store, row_of, over, info, bound)
        info["cache"] = "miss"
    if pipeline is not None:
        try:
            if not np.array_equal(positions, np.arange(len(result))):
                raise AssertionError("the pipeline tokenized every valid record; this selection is a subset")
            pipeline.finish(result.adapter)
            if result.stamp is not None and result.source.stamp() != result.stamp:
                raise DataError(f"{result.source.path}: the file changed while it was being read; run again")
            store = pipeline.writer.finish(path)
        except BaseException:
            pipeline.abort()
            pipeline.writer.abort()
            raise
        if len(store) != len(indices) or not np.array_equal(store.index, indices):  # pragma: no cover - a bug
            raise AssertionError(f"{result.source.path}: the tokenized rows do not match the validated records")
        info["workers"] = pipeline.workers
        _note_hint(hint, key)
        return Tokenized(result, store, row_of, over, info, bound)
    job = RenderJob(tokenizer, result.source, result.adapter, data_cfg.response_template, data_cfg.system_prompt)
    step = tokenizing.CHUNK_RECORDS
    tasks = [(indices[a:a + step], result.start[inside[a:a + step]], result.end[inside[a:a + step]],
              result.line[inside[a:a + step]]) for a in range(0, len(inside), step)]
    workers = tokenizing.workers_for(int(data_cfg.num_proc), len(inside))
    info["workers"] = workers
    name = os.path.basename(str(sc.spec.path))
    writer = StoreWriter(path, ids_dtype=id_dtype(len(tokenizer)))
    try:
        for arrays in render_chunks(job, tasks, workers, f"tokenizing {name}", progress):
            writer.add(*arrays)
        if result.stamp is not None and result.source.stamp() != result.stamp:
            raise DataError(f"{result.source.path}: the file changed while it was being read; run again")
        store = writer.finish()
    except BaseException:
        writer.abort()
        raise
    if use_cache:
        _note_hint(hint, key)
    return Tokenized(result, store, row_of, over, info, bound)


def _where(result: Scan, position: int) -> str:
    line = int(result.line[position])
    return f"{result.source.path}: record #{int(result.index[position])}" + (f" (line {line})" if line >= 0 else "")


def _over_bound(tok: Tokenized, positions: np.ndarray, tokenizer: Any, data_cfg: Any, max_len: int,
                overlong: str) -> tuple[Optional[TokenStore], dict, np.ndarray]:
    """Records over the character bound among `positions`: (a store of their truncated prefixes, counts, the
    positions it holds). drop/error decide without tokenizing; truncate tokenizes a prefix."""
    result = tok.scan
    counts = {"dropped_overlong": 0, "dropped_prompt_too_long": 0}
    over = positions[np.isin(positions, tok.over)]
    if not len(over):
        return None, counts, over
    bound = tok.bound
    per = bound // max_len
    prompt_over = result.prompt_chars[over] > bound
    if overlong == "error":
        p = int(over[0])
        what = "its prompt alone has" if prompt_over[0] else "it has"
        raise DataError(f"{_where(result, p)}: {what} {int(result.prompt_chars[p] if prompt_over[0] else result.chars[p]):,} "
                        f"characters, certainly over data.max_seq_len={max_len} tokens (a token of this tokenizer "
                        f"covers at most {per} characters); raise max_seq_len, or set data.overlong=drop"
                        + ("" if prompt_over[0] else "|truncate"))
    counts["dropped_prompt_too_long"] = int(prompt_over.sum())
    if overlong == "drop":
        counts["dropped_overlong"] = int((~prompt_over).sum())
        return None, counts, over[:0]
    keep = over[~prompt_over]
    if not len(keep):
        return None, counts, keep
    budget = (max_len + _MARGIN_TOKENS) * per
    records = [truncated_prefix(r, budget) for r in result.rows(keep)]
    rendered = render_records(tokenizer, records, data_cfg.response_template, data_cfg.system_prompt)
    ids, lengths, spans, n_spans, index = pack(rendered, result.index[keep])
    mem = StoreWriter(None)
    mem.add(ids, lengths, spans, n_spans, index)
    log.info("%s: %d records over %s characters tokenized only up to %s characters (data.overlong=truncate)",
             result.source.path, len(keep), f"{bound:,}", f"{budget:,}")
    return mem.finish(), counts, keep


def select_examples(tok: Tokenized, positions: np.ndarray, tokenizer: Any, data_cfg: Any, stats: dict,
                    prefix: str) -> Examples:
    """The examples of the records at these scan positions (in this order), under the length policy; counts go
    to stats[prefix + ...]."""
    max_len, overlong = int(data_cfg.max_seq_len), data_cfg.overlong
    last_only = data_cfg.loss_turns == "last"
    positions = np.asarray(positions, dtype=np.int64)
    over_store, counts, over_kept = _over_bound(tok, positions, tokenizer, data_cfg, max_len, overlong)
    stores = [tok.store] + ([over_store] if over_store is not None else [])
    store_of = np.zeros(len(positions), dtype=np.int32)
    rows = tok.row_of[positions].copy()
    if over_store is not None:
        over_row = np.full(len(tok.scan), -1, dtype=np.int64)
        over_row[over_kept] = np.arange(len(over_kept))
        in_over = over_row[positions] >= 0
        store_of[in_over] = 1
        rows[in_over] = over_row[positions][in_over]
    present = rows >= 0  # the rest: over the character bound and dropped without tokenizing
    positions, store_of, rows = positions[present], store_of[present], rows[present]
    n = np.zeros(len(rows), dtype=np.int64)
    prompt_len = np.zeros(len(rows), dtype=np.int64)
    loss_end = np.zeros(len(rows), dtype=np.int64)
    for s, store in enumerate(stores):
        m = store_of == s
        r = rows[m]
        n[m] = store.offsets[r + 1] - store.offsets[r]
        last_start, last_end = store.last_spans()
        prompt_len[m] = last_start[r] if last_only else store.first_starts()[r]
        loss_end[m] = last_end[r]
    ok = loss_end <= max_len
    prompt_over = ~ok & (prompt_len >= max_len)
    long = ~ok & ~prompt_over
    if overlong == "error" and (prompt_over.any() or long.any()):
        i = int(np.flatnonzero(prompt_over | long)[0])
        status = "error_prompt_too_long" if prompt_over[i] else "error_overlong"
        raise length_error(status, _where(tok.scan, int(positions[i])), int(prompt_len[i]), int(loss_end[i]),
                           max_len)
    keep = ok | long if overlong == "truncate" else ok
    ends = np.where(ok, np.minimum(n, max_len), max_len)
    stats[prefix + "truncated"] = int(long.sum()) if overlong == "truncate" else 0
    stats[prefix + "dropped_overlong"] = (int(long.sum()) if overlong == "drop" else 0) + counts["dropped_overlong"]
    stats[prefix + "dropped_prompt_too_long"] = int(prompt_over.sum()) + counts["dropped_prompt_too_long"]
    return Examples(stores, store_of[keep], rows[keep], ends[keep], last_only)


def example_stats(ex: Examples) -> dict:
    """Tokens, loss-carrying tokens, longest and mean length of a set of examples."""
    if not len(ex):
        return {"examples": 0, "tokens": 0, "loss_tokens": 0, "max_len": 0, "mean_len": 0.0}
    loss = 0
    for s, store in enumerate(ex.stores):
        m = ex.store_of == s
        if not m.any():
            continue
        rows, ends = ex.rows[m], ex.ends[m]
        so = store.span_offsets
        if ex.last_only:
            first, count = so[rows + 1] - 1, np.ones(len(rows), dtype=np.int64)
        else:
            first, count = so[rows], so[rows + 1] - so[rows]
        total = int(count.sum())
        span_idx = np.repeat(first - np.cumsum(count) + count, count) + np.arange(total)
        sp = store.spans[span_idx].astype(np.int64)
        end_rep = np.repeat(ends, count)
        loss += int(np.clip(np.minimum(sp[:, 1], end_rep) - sp[:, 0], 0, None).sum())
    tokens = int(ex.ends.sum())
    return {"examples": len(ex), "tokens": tokens, "loss_tokens": loss, "max_len": int(ex.ends.max()),
            "mean_len": round(tokens / len(ex), 1)}


def _put(stats: dict, prefix: str, ex: Examples) -> None:
    for k, v in example_stats(ex).items():
        stats[prefix + k] = v


# ------------------------------------------------------------------------------------------------- the run


def _no_empty_source(sources: list[SourceConfig], parts: list[dict], max_len: int, overlong: str) -> None:
    """A weighted source without one training example would make the mixture draw nothing at all: name it."""
    for sc, p in zip(sources, parts):
        wanted = (sc.count or 0) > 0 if sc.count is not None else (sc.weight or 0) > 0
        if wanted and not len(p["train"]):
            st = p["stats"]
            hint = "raise data.max_seq_len" + ("" if overlong == "truncate" else " or set data.overlong=truncate")
            raise DataError(
                f"data.mixture source {sc.name!r} ({sc.spec.path}): none of its {st['train_records']} training records "
                f"fits data.max_seq_len={max_len} ({st['dropped_overlong']} over-long, "
                f"{st['dropped_prompt_too_long']} with the prompt alone over it), so the mixture has nothing to draw "
                f"at its weight; {hint}, or drop the source")


def build_sft_data(
    data_cfg: Any,
    tokenizer: Any,
    seed: int,
    max_samples: Optional[int] = None,
    use_cache: bool = True,
    progress: Optional[bool] = None,
) -> SFTData:
    """Validated, split, tokenized and masked training (and validation) examples for `data_cfg`.

    max_samples overrides data.max_samples when given (0 or None = all; per source of a mixture). The train set
    is shuffled once by `seed` (when data.shuffle); per-epoch shuffling is the training loop's job.
    """
    t0 = time.perf_counter()
    ensure_chat_template(tokenizer)
    max_len, overlong = int(data_cfg.max_seq_len), data_cfg.overlong
    if overlong not in OVERLONG:
        raise DataError(f"data.overlong={overlong!r} is not one of {list(OVERLONG)}")
    if data_cfg.loss_turns not in ("all", "last"):
        raise DataError(f"data.loss_turns={data_cfg.loss_turns!r} is not one of ['all', 'last']")
    sources = source_configs(data_cfg, str(cache_root(data_cfg) / "hf"))
    cap = max_samples if max_samples is not None else data_cfg.max_samples
    bound = char_bound(tokenizer, max_len)
    tok_fp = tokenizer_fingerprint(tokenizer)
    val_path = data_cfg.val_path
    val_ratio_default = float(data_cfg.val_ratio)
    if val_path and (val_ratio_default > 0 or any(s.val_ratio > 0 for s in sources)):
        log.warning("data.val_path is set: data.val_ratio=%s is ignored", val_ratio_default)

    val_tok = None
    if val_path:
        vsc = SourceConfig("validation", -1, SourceSpec(val_path, data_cfg.file_type, data_cfg.split, data_cfg.subset,
                                                        data_cfg.revision, str(cache_root(data_cfg) / "hf"),
                                                        "data.val_path"),
                           data_cfg.format, top_level_options(data_cfg), 0.0)
        vscan = open_scanned(vsc, data_cfg)
        val_tok = tokenize_scan(tokenizer, vsc, data_cfg, vscan, np.arange(len(vscan)), use_cache, progress, bound,
                                tok_fp)
    held = val_tok.scan.digest if val_tok is not None else None

    stats: dict[str, Any] = {}
    parts = []
    for sc in sources:
        parts.append(_prepare(sc, data_cfg, tokenizer, seed, cap, use_cache, progress, bound, tok_fp, held))
    if len(sources) > 1:
        _no_empty_source(sources, parts, max_len, overlong)
    counts = draw_counts(sources, [len(p["train"]) for p in parts])
    train_parts = []
    for sc, p, k in zip(sources, parts, counts):
        rng = np.random.default_rng([int(seed), sc.position])
        picked = p["train"].take(draw(len(p["train"]), k, rng)) if k != len(p["train"]) else p["train"]
        train_parts.append(picked)
        p["stats"]["train_examples"] = len(picked)
        s = example_stats(picked)
        p["stats"]["train_tokens"], p["stats"]["train_loss_tokens"] = s["tokens"], s["loss_tokens"]
    order = None
    if len(sources) > 1 and data_cfg.shuffle:
        order = np.random.default_rng([int(seed), 7919]).permutation(sum(len(x) for x in train_parts))
    train = Examples.concat(train_parts, order) if len(train_parts) > 1 else train_parts[0]

    val_records: list[Record] = []
    val_parts = []
    if val_tok is not None:
        vpos = np.arange(len(val_tok.scan))
        val_parts.append(select_examples(val_tok, vpos, tokenizer, data_cfg, stats, "val_"))
        val_records = val_tok.scan.rows(vpos)
        stats["val_content_hash"] = val_tok.scan.report.content_hash
        stats["val_records"] = len(val_records)
    else:
        vcounts = {"truncated": 0, "dropped_overlong": 0, "dropped_prompt_too_long": 0}
        for p in parts:
            if p["val"] is not None:
                val_parts.append(p["val"])
                val_records.extend(p["val_records"])
                for k in vcounts:
                    vcounts[k] += p["val_counts"].get("val_" + k, 0)
        if val_parts:
            stats.update({"val_" + k: v for k, v in vcounts.items()})
            stats["val_records"] = len(val_records)
    val = (Examples.concat(val_parts) if len(val_parts) > 1 else val_parts[0]) if val_parts else None

    reports = [p["report"] for p in parts]
    stats.update({
        "records": sum(r.total for r in reports),
        "kept": sum(r.kept for r in reports),
        "invalid": sum(r.n_invalid for r in reports),
        "invalid_skipped": sum(r.n_invalid for r in reports),  # only non-zero under data.on_invalid=skip
        "duplicates": sum(r.duplicates for r in reports),
        "extra_fields": _merge_counts(r.extra_fields for r in reports),
        "content_hash": reports[0].content_hash if len(reports) == 1 else hashlib.blake2b(
            json.dumps([(s.name, r.content_hash, s.weight, s.count) for s, r in zip(sources, reports)]).encode(),
            digest_size=16).hexdigest(),
        "selected": sum(p["stats"]["selected"] for p in parts),
        "train_records": sum(p["stats"]["train_records"] for p in parts),
        "val_overlap_dropped": sum(p["stats"].get("val_overlap_dropped", 0) for p in parts),
        "header_clashes": sum(r.header_clashes for r in reports),
    })
    for k in ("truncated", "dropped_overlong", "dropped_prompt_too_long"):
        stats[k] = sum(p["stats"][k] for p in parts)
    _put(stats, "", train)
    if val is not None:
        _put(stats, "val_", val)
    caches = [p["info"]["cache"] for p in parts]
    stats["cache"] = "miss" if "miss" in caches else caches[0] if len(set(caches)) == 1 else "partial"
    if "cache_path" in parts[0]["info"]:
        stats["cache_path"] = parts[0]["info"]["cache_path"]
    stats["sources"] = [p["stats"] for p in parts]
    log_sources(stats["sources"])

    where = sources[0].spec.path if len(sources) == 1 else "data.mixture"
    if not len(train):
        hint = ("raise data.max_seq_len (data.overlong=truncate is set: only prompts too long even for it remain)"
                if overlong == "truncate" else "raise data.max_seq_len or set data.overlong=truncate")
        raise DataError(
            f"{where}: no training example fits data.max_seq_len={max_len}: "
            f"{stats['dropped_overlong']} dropped as over-long, {stats['dropped_prompt_too_long']} with a prompt "
            f"alone over the limit; {hint}"
        )
    dropped = stats["dropped_overlong"] + stats["dropped_prompt_too_long"]
    if dropped or stats["truncated"]:
        log.warning(
            "%s: %d of %d training examples over data.max_seq_len=%d: %d dropped (%d with the prompt alone over "
            "it), %d truncated",
            where, dropped + stats["truncated"], stats["train_records"], max_len, dropped,
            stats["dropped_prompt_too_long"], stats["truncated"],
        )
    if stats.get("val_records") and not (val is not None and len(val)):
        hint = ("raise data.max_seq_len" if overlong == "truncate"
                else "raise data.max_seq_len or set data.overlong=truncate")
        log.warning(
            "%s: all %d validation records are over data.max_seq_len=%d (%d dropped as over-long, %d with a prompt "
            "alone over it): there is no validation loss; %s", val_path or where, stats["val_records"], max_len,
            stats.get("val_dropped_overlong", 0), stats.get("val_dropped_prompt_too_long", 0), hint)
    stats["seconds"] = round(time.perf_counter() - t0, 3)
    log.info(
        "data: %d train examples (%d tokens, %d with loss)%s; %s in %.2fs (cache %s)",
        len(train), stats["tokens"], stats["loss_tokens"],
        f", {len(val)} validation examples" if val is not None else "", where, stats["seconds"], stats["cache"],
    )
    return SFTData(train=train, val=val, val_records=val_records, stats=stats, report=reports[0])


def _merge_counts(dicts) -> dict:
    out: dict[str, int] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


def _prepare(sc: SourceConfig, data_cfg: Any, tokenizer: Any, seed: int, cap: Optional[int], use_cache: bool,
             progress: Optional[bool], bound: Optional[int], tok_fp: str, held: Optional[np.ndarray]) -> dict:
    """One source: validated, split, tokenized, under the length policy (its training examples before the mix)."""
    source = open_source(sc.spec)
    pipeline = _pipeline_for(sc, data_cfg, tokenizer, source, held is None and not (cap and cap > 0), use_cache,
                             bound, tok_fp, progress)
    try:
        return _prepare_scanned(sc, data_cfg, tokenizer, seed, cap, use_cache, progress, bound, tok_fp, held, source,
                                pipeline)
    except BaseException:
        if pipeline is not None:
            pipeline.abort()
            pipeline.writer.abort()
        raise


def _prepare_scanned(sc: SourceConfig, data_cfg: Any, tokenizer: Any, seed: int, cap: Optional[int],
                     use_cache: bool, progress: Optional[bool], bound: Optional[int], tok_fp: str,
                     held: Optional[np.ndarray], source: Source, pipeline: Optional[tokenizing.Pipeline]) -> dict:
    result = open_scanned(sc, data_cfg, source, sink=pipeline.feed if pipeline is not None else None)
    report = result.report
    order = list(range(len(result)))
    if data_cfg.shuffle:
        random.Random(seed if sc.position == 0 else seed * 1_000_003 + sc.position).shuffle(order)
    if cap and cap > 0:
        order = order[:cap]
    order_arr = np.asarray(order, dtype=np.int64)
    s: dict[str, Any] = {"name": sc.name, "path": str(sc.spec.path), "format": report.record_format,
                         "file_type": report.format, "records": report.total, "valid": report.kept,
                         "selected": len(order)}
    if sc.weight is not None:
        s["weight"] = sc.weight
    if sc.count is not None:
        s["count"] = sc.count
    ratio = sc.val_ratio if held is None else 0.0
    val_pos = order_arr[:0]
    if held is not None:
        train_pos = order_arr
    elif ratio > 0:
        n_val = max(1, round(len(order_arr) * ratio))
        if n_val >= len(order_arr):
            what = "data.val_ratio" if sc.key == "data" else f"{sc.key}.val_ratio"
            raise DataError(f"{what}={ratio} leaves no training records out of {len(order_arr)} in {sc.spec.path}; "
                            "lower it or add data")
        train_pos, val_pos = order_arr[:-n_val], order_arr[-n_val:]
    else:
        train_pos = order_arr
    held_digests = held if held is not None else (result.digest[val_pos] if len(val_pos) else None)
    if held_digests is not None and len(held_digests):
        before = len(train_pos)
        train_pos = train_pos[~np.isin(result.digest[train_pos], held_digests)]
        overlap = before - len(train_pos)
        s["val_overlap_dropped"] = overlap
        if overlap:
            log.warning("%s: %d training records duplicate a validation record; removed from training",
                        sc.spec.path, overlap)
        if not len(train_pos):
            raise DataError(f"{sc.spec.path}: every training record is also a validation record")
    s["train_records"] = len(train_pos)
    # One tokenization (and cache entry) for every selected record of the source, whatever the split, so
    # another seed or val_ratio reuses it; a separate val_path file has its own entry.
    tok = tokenize_scan(tokenizer, sc, data_cfg, result, order_arr if held is None else train_pos, use_cache,
                        progress, bound, tok_fp, pipeline)
    s["tokenized_by"] = tok.info.get("workers", 0)  # processes that tokenized it (0: from the cache)
    counts: dict[str, Any] = {}
    train = select_examples(tok, train_pos, tokenizer, data_cfg, counts, "")
    for k in ("truncated", "dropped_overlong", "dropped_prompt_too_long"):
        s[k] = counts[k]
    s["train_available"] = len(train)
    val, val_records, val_counts = None, [], {}
    if len(val_pos):
        val = select_examples(tok, val_pos, tokenizer, data_cfg, val_counts, "val_")
        by_index = {r.index: r for r in result.rows(val_pos)}
        val_records = [by_index[int(i)] for i in result.index[val_pos]]
        vs = example_stats(val)
        s["val_examples"], s["val_tokens"] = vs["examples"], vs["tokens"]
    return {"train": train, "val": val, "val_records": val_records, "val_counts": val_counts, "stats": s,
            "report": report, "info": tok.info}
