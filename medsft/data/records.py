"""Load and validate records: every record of a source (medsft.data.sources) through its format's adapter
(medsft.data.formats), before any model work, so a bad source fails in a second with a summary that names the
file, the record index (0-based), its line (JSON and JSONL) and the field, e.g.

    data/x.jsonl: 3 of 1200 records invalid: #17 (line 18) missing 'Respuesta'; #40 (line 41) 'Pregunta' is
    empty; #97 (line 98) 'Respuesta' is a number, expected a string. Fix them, or set data.on_invalid=skip to drop
    them.

`scan` streams: it keeps, per valid record, a few numbers (index, line, byte span, a hash of its text, its
length in characters), never the records themselves, so a source of any size is validated in bounded memory.
`load_records` is the same validation returning the `Record`s (small files, the CLI, tests).
"""

from __future__ import annotations

import hashlib
import logging
import os
from array import array
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import numpy as np

from medsft.data.base import MAX_KEPT_MESSAGES, LoadReport, Record, Turn, count_extra, listing, type_name
from medsft.data.formats import Adapter, FormatOptions, adapter_for, check_format_name, detect_format
from medsft.data.sources import INVALID, RawItem, Source, SourceSpec, open_source
from medsft.errors import DataError

__all__ = ["LoadReport", "Record", "Turn", "Scan", "scan", "load_records", "read_raw", "records_key", "digest"]

log = logging.getLogger(__name__)

ON_INVALID = ("error", "skip")
HEADERS_IN_TEXT = ("warn", "skip", "error")

# Names other modules imported before the record types moved to medsft.data.base.
_listing = listing
_type_name = type_name


def digest(rec: Record) -> int:
    """A 64-bit hash of what makes two records duplicates (`Record.key`). Python's own hash: it is compared only
    within one process (duplicates, train/validation overlap), never stored."""
    return hash(rec.key()) & 0xFFFF_FFFF_FFFF_FFFF


@dataclass
class Scan:
    """The validated records of one source, as arrays (one entry per valid record, in source order)."""

    source: Source
    adapter: Adapter
    report: LoadReport
    index: np.ndarray  # int64: position in the source
    line: np.ndarray  # int64: 1-based line, -1 where none
    start: np.ndarray  # int64: byte span in the file, -1 where none
    end: np.ndarray
    digest: np.ndarray  # uint64: hash of the record's text (duplicates, train/validation overlap)
    chars: np.ndarray  # int64: characters of text the record renders
    prompt_chars: np.ndarray  # int64: characters before its first assistant turn
    records: Optional[list[Record]] = None  # with keep=True
    clashes: list[str] = field(default_factory=list)  # (first messages) records holding the layout's headers
    stamp: Optional[tuple] = None  # the source file's (size, mtime) when it was opened

    def __len__(self) -> int:
        return len(self.index)

    def rows(self, positions: Iterable[int]) -> list[Record]:
        """The records at these positions of the scan (not source indices), read again from the source."""
        pos = np.asarray(sorted(set(int(p) for p in positions)), dtype=np.int64)
        if not len(pos):
            return []
        return fetch(self.source, self.adapter, self.index[pos], self.start[pos], self.end[pos], self.line[pos])


def fetch(source: Source, adapter: Adapter, indices, starts, ends, lines) -> list[Record]:
    """Records at these source indices (sorted), read again and normalised; DataError if the source changed."""
    has_spans = len(starts) and int(starts[0]) >= 0
    items = source.read(indices, starts if has_spans else None, ends if has_spans else None, lines)
    out = []
    for item in items:
        if item.value is INVALID:
            raise DataError(f"{source.path}: record #{item.index} changed while being read ({item.problems})")
        norm = adapter.normalize(item.value, item.index, None if item.line is None or item.line < 0 else item.line,
                                 source.path, item.bad_bytes)
        if norm.record is None:
            raise DataError(f"{source.path}: record #{item.index} changed while being read: "
                            + ", ".join(norm.problems))
        out.append(norm.record)
    return out


def _where(item: RawItem) -> str:
    return f"#{item.index}" + (f" (line {item.line})" if item.line is not None else "")


def _first_prompt_chars(rec: Record) -> int:
    if rec.turns is None:
        return len(rec.question) + len(rec.system or "")
    n = len(rec.system or "")
    for t in rec.turns:
        if t.role == "assistant":
            break
        n += len(t.content)
    return n


def scan(
    source: Source,
    fmt: str,
    opts: FormatOptions,
    on_invalid: str = "error",
    headers_in_text: str = "warn",
    keep: bool = False,
    key: str = "data",
    sink: Optional[Any] = None,
) -> Scan:
    """Validate every record of `source` in format `fmt` (auto: detected from the first record).

    on_invalid="error" raises DataError listing the invalid records; "skip" drops them with a warning. Records
    whose text holds the response layout's own headers are warned about (headers_in_text=warn), dropped (skip)
    or refused (error). Duplicates are counted and kept (with a warning); unknown keys are ignored and counted.
    sink(adapter, index, start, end, line, chars) is called for each valid record as it is found (tokenizing
    workers start on the first records while the rest are read: medsft.data.tokenize.Pipeline).
    """
    top = key.split(".")[0]  # on_invalid and headers_in_text are keys of `data` itself
    if on_invalid not in ON_INVALID:
        raise DataError(f"{top}.on_invalid={on_invalid!r} is not one of {list(ON_INVALID)}")
    if headers_in_text not in HEADERS_IN_TEXT:
        raise DataError(f"{top}.headers_in_text={headers_in_text!r} is not one of {list(HEADERS_IN_TEXT)}")
    fmt = check_format_name(fmt, f"{key}.format")
    path = source.path
    report = LoadReport(path=path, format=source.kind)
    cols = {k: array("q") for k in ("index", "line", "start", "end", "chars", "prompt_chars")}
    digests = array("Q")
    records: Optional[list[Record]] = [] if keep else None
    bad: list[str] = []
    clashes: list[str] = []
    extra: Counter[str] = Counter()
    key_sample: Counter[str] = Counter()
    missing_q = total = 0
    adapter: Optional[Adapter] = None
    pending: list[RawItem] = []
    known: set = set()

    def resolve(first: Any) -> Adapter:
        name = fmt
        if fmt == "auto":
            name = detect_format(first, opts) or "medsft"
            report.detected = True
        report.record_format = name
        return adapter_for(name, opts)

    def handle(item: RawItem) -> None:
        nonlocal missing_q
        if item.value is INVALID:
            _bad(f"{_where(item)} " + ", ".join(item.problems))
            return
        norm = adapter.normalize(item.value, item.index, item.line, path, item.bad_bytes)
        if isinstance(item.value, dict):
            count_extra(extra, item.value, known)
            if len(key_sample) < 64:
                key_sample.update(item.value.keys())
        if norm.record is None:
            missing_q += norm.missing_question
            _bad(f"{_where(item)} " + ", ".join(norm.problems))
            return
        rec = norm.record
        if norm.clash:
            report.header_clashes += 1
            if len(clashes) < MAX_KEPT_MESSAGES:
                clashes.append(f"{_where(item)} {norm.clash}")
            if headers_in_text == "skip":
                report.skipped_clashes += 1
                return
        cols["index"].append(item.index)
        cols["line"].append(-1 if item.line is None else item.line)
        cols["start"].append(item.start)
        cols["end"].append(item.end)
        cols["chars"].append(rec.chars())
        cols["prompt_chars"].append(_first_prompt_chars(rec))
        digests.append(digest(rec))
        if records is not None:
            records.append(rec)
        if sink is not None:
            sink(adapter, item.index, item.start, item.end, item.line, cols["chars"][-1])

    def _bad(message: str) -> None:
        report.n_invalid += 1
        if len(bad) < MAX_KEPT_MESSAGES:
            bad.append(message)

    for item in source.items():
        total += 1
        if adapter is None:
            if (item.value is INVALID or not isinstance(item.value, dict)) and len(pending) < 1000:
                pending.append(item)
                continue
            adapter = resolve(item.value if isinstance(item.value, dict) else None)
            known = adapter.known()
            for p in pending:
                handle(p)
            pending = []
        handle(item)
    if adapter is None:  # nothing but invalid items
        adapter = resolve(None)
        known = adapter.known()
        for p in pending:
            handle(p)
    report.total = total
    report.format = source.kind  # a .json file holding JSONL reads as JSONL
    report.invalid = bad
    report.extra_fields = dict(extra)
    arrays = {k: np.frombuffer(v, dtype=np.int64).copy() if len(v) else np.zeros(0, np.int64)
              for k, v in cols.items()}
    dig = np.frombuffer(digests, dtype=np.uint64).copy() if len(digests) else np.zeros(0, np.uint64)
    report.kept = len(dig)
    report.duplicates = int(len(dig) - len(np.unique(dig))) if len(dig) else 0
    _report_problems(report, bad, clashes, adapter, missing_q, key_sample, on_invalid, headers_in_text, key,
                     fmt == "auto")
    return Scan(source, adapter, report, arrays["index"], arrays["line"], arrays["start"], arrays["end"], dig,
                arrays["chars"], arrays["prompt_chars"], records, clashes)


def _report_problems(report: LoadReport, bad: list[str], clashes: list[str], adapter: Adapter, missing_q: int,
                     key_sample: Counter, on_invalid: str, headers_in_text: str, key: str, detected: bool) -> None:
    path, n_bad, total = report.path, report.n_invalid, report.total
    fmt_note = f" Record format: {adapter.describe()}{', detected from the first record' if detected else ''}."
    if n_bad:
        head = f"{path}: {n_bad} of {total} records invalid: {listing(bad, n_bad)}"
        hint = fmt_note if missing_q != total else ""
        if missing_q == total:  # the whole source uses other keys: say that first, list only a few
            preset = "Question" in key_sample and "Complex_CoT" in key_sample
            head = (
                f"{path}: no record has {adapter.primary()} of {adapter.describe()} (keys in the file: "
                f"{sorted(key_sample)[:12]}); "
                f"map your keys with {key}.fields.question/reasoning/response, or name the record format with "
                f"{key}.format (medsft | huatuo | messages | sharegpt | alpaca; auto detects it)"
                + (" or use the preset for HuatuoGPT-o1's English schema (data=huatuo_en; "
                   "`medsft data ... --fields-preset huatuo_en`)" if preset else "")
                + f". {n_bad} of {total} records invalid: {listing(bad[:3], n_bad)}"
            )
        if any("not valid UTF-8" in b for b in bad):
            hint += " Save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 in.json > out.json`)."
        top = key.split(".")[0]
        if on_invalid == "error" or report.kept == 0:
            tail = f" Fix them, or set {top}.on_invalid=skip to drop them." if report.kept else ""
            raise DataError(head + "." + hint + tail)
        log.warning("%s; skipped (%s.on_invalid=skip)", head, top)
    if report.header_clashes:
        n = report.header_clashes
        what = (f"{path}: {n} of {total} records hold the response layout's own headers in their text, so the "
                f"trained layout repeats a header and the format check would call it wrong: {listing(clashes, n)}")
        top = key.split(".")[0]
        if headers_in_text == "error":
            raise DataError(what + f". Edit them, or set {top}.headers_in_text=skip to drop them (warn to train "
                                   "them as they are).")
        if headers_in_text == "skip":
            log.warning("%s; skipped (%s.headers_in_text=skip)", what, top)
            if report.kept == 0:
                raise DataError(f"{path}: every valid record holds the layout's headers ({top}.headers_in_text=skip)")
        else:
            log.warning("%s; trained as they are (%s.headers_in_text=skip drops them, error refuses them)", what, top)
    if report.duplicates:
        log.warning("%s: %d duplicate records (the same text as an earlier one); kept", path, report.duplicates)
    if report.extra_fields:
        log.info("%s: extra fields ignored: %s", path, report.extra_fields)


def load_records(
    path: str | os.PathLike,
    fields: Any,
    on_invalid: str = "error",
    file_type: str = "auto",
    record_format: str = "medsft",
    response_template: Optional[str] = None,
    headers_in_text: str = "warn",
) -> tuple[list[Record], LoadReport]:
    """Load and validate every record of the local file `path`; map `fields` (the `data.fields` node, or a
    dict) onto `Record`s. record_format: medsft (the field map), huatuo, messages, sharegpt, alpaca, or auto."""
    if on_invalid not in ON_INVALID:
        raise DataError(f"data.on_invalid={on_invalid!r} is not one of {list(ON_INVALID)}")
    source = open_source(SourceSpec(os.fspath(path), file_type))
    result = scan(source, record_format, FormatOptions.of(fields, response_template), on_invalid, headers_in_text,
                  keep=True)
    report = result.report
    report.content_hash = source.content_hash
    return result.records, report


def _bad_utf8_fields(value: Any) -> list[str]:
    """Keys of `value` whose text holds bytes that are not UTF-8 (kept as surrogates); iterative (no recursion)."""

    def bad(v: Any) -> bool:
        stack = [v]
        while stack:
            x = stack.pop()
            if isinstance(x, str):
                try:
                    x.encode("utf-8")
                except UnicodeEncodeError:
                    return True
            elif isinstance(x, dict):
                stack.extend(x.keys())
                stack.extend(x.values())
            elif isinstance(x, list):
                stack.extend(x)
        return False

    if isinstance(value, dict):
        return [k.encode("utf-8", "surrogateescape").decode("utf-8", "replace") for k, v in value.items()
                if bad(k) or bad(v)]
    return ["(record)"] if bad(value) else []


RawItems = list[tuple[Any, Optional[int]]]  # (parsed value or the invalid marker, line)


def read_raw(path: str | os.PathLike, fmt: str = "auto") -> tuple[RawItems, dict[int, list[str]], str, str]:
    """Parse a local file into raw items: ([(value, line)], {index: [problems]}, file type, content_hash).

    For small files (RL questions): the items are held in memory. File-level problems raise DataError;
    per-record problems (bad JSONL lines, text that is not UTF-8) are returned so on_invalid=skip can drop them.
    """
    source = open_source(SourceSpec(os.fspath(path), fmt))
    items: RawItems = []
    problems: dict[int, list[str]] = {}
    for item in source.items():
        value = item.value
        if value is INVALID:
            problems[item.index] = list(item.problems)
        elif item.bad_bytes:
            keys = _bad_utf8_fields(value) or ["(record)"]
            problems[item.index] = [f"{k!r} is not valid UTF-8" for k in keys]
            value = INVALID
        items.append((value, item.line))
    return items, problems, source.kind, source.content_hash


def records_key(records: Iterable[Record]) -> str:
    """A short hash of which records (by source index) were selected; part of the cache key."""
    h = hashlib.blake2b(digest_size=12)
    for r in records:
        h.update(int(r.index).to_bytes(8, "little"))
    return h.hexdigest()


def indices_key(indices: np.ndarray) -> str:
    """`records_key` of records at these source indices."""
    return hashlib.blake2b(np.ascontiguousarray(indices, dtype="<i8").tobytes(), digest_size=12).hexdigest()
