"""Load SFT records from JSON / JSONL / parquet, validate the whole file, map fields to `Record`s.

Validation runs over every record before any model work, so a bad file fails in a second with a summary
that names the file, the record index (0-based), its line (JSON and JSONL) and the field, e.g.

    data/x.jsonl: 3 of 1200 records invalid: #17 (line 18) missing 'Respuesta'; #40 (line 41) 'Pregunta' is
    empty; #97 (line 98) 'Respuesta' is a number, expected a string. Fix them, or set data.on_invalid=skip to drop
    them.

Why the standard library's `json` and not `datasets.load_dataset("json")`: pyarrow's JSON reader stops at the
first bad line of a file without a record index or line, infers one schema for the whole file (a single record
with a number where text is expected fails or silently coerces the column), and writes an Arrow copy of every
file to its cache. We need per-record, per-line messages, and parsing is not the bottleneck (~50 MB/s here,
validation included; tokenization costs 50-100x more). The tokenized result is cached by `medsft.data.dataset`,
which is where a cache pays. Parquet goes through pyarrow (a dependency of `datasets`): it is typed already.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

from medsft.errors import DataError

log = logging.getLogger(__name__)

# How many invalid records an error message lists before "and N more".
MAX_LISTED = 10


@dataclass
class Record:
    """One validated SFT record, with the fields already mapped and stripped of surrounding whitespace."""

    question: str
    reasoning: str
    response: str
    source: Optional[str]
    index: int  # 0-based position in the file (as in error messages: "#17")
    line: Optional[int]  # 1-based line where the record starts (JSON and JSONL); None for parquet
    path: Optional[str] = None  # the data file it came from (for messages)

    def where(self) -> str:
        """`data/x.jsonl: record #17 (line 18)` for error messages."""
        line = f" (line {self.line})" if self.line is not None else ""
        prefix = f"{self.path}: " if self.path else ""
        return f"{prefix}record #{self.index}{line}"

    def key(self) -> tuple[str, str, str]:
        """What makes two records duplicates: the same question, reasoning and response."""
        return (self.question, self.reasoning, self.response)


@dataclass
class LoadReport:
    path: str
    total: int = 0  # records in the file
    kept: int = 0  # records returned
    invalid: list[str] = field(default_factory=list)  # one message per invalid record
    duplicates: int = 0  # records identical (question, reasoning, response) to an earlier one; kept
    extra_fields: dict[str, int] = field(default_factory=dict)  # unknown key -> records having it; ignored
    format: str = ""  # json | jsonl | parquet
    content_hash: str = ""  # blake2b of the file's bytes (cache key)

    def summary(self) -> str:
        parts = [f"{self.path}: {self.total} records ({self.format})", f"{self.kept} kept"]
        if self.invalid:
            parts.append(f"{len(self.invalid)} invalid (skipped)")
        if self.duplicates:
            parts.append(f"{self.duplicates} duplicates (kept)")
        if self.extra_fields:
            extras = ", ".join(f"{k!r} x{v}" for k, v in sorted(self.extra_fields.items()))
            parts.append(f"extra fields ignored: {extras}")
        return "; ".join(parts)


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    names = {dict: "an object", list: "a list", bool: "a boolean", int: "a number", float: "a number", str: "a string"}
    return names.get(type(value), type(value).__name__)


def _listing(messages: list[str]) -> str:
    shown = "; ".join(messages[:MAX_LISTED])
    more = len(messages) - MAX_LISTED
    return shown + (f"; and {more} more" if more > 0 else "")


def detect_format(path: str, head: bytes, fmt: str = "auto") -> str:
    """json | jsonl | parquet, from the extension, else from the first bytes."""
    if fmt != "auto":
        return fmt
    lower = path.lower()
    if lower.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    if lower.endswith((".parquet", ".pq")) or head[:4] == b"PAR1":
        return "parquet"
    # .json or anything else: a list is JSON; an object at the start may be JSONL (checked while parsing).
    return "json"


def _decode_utf8(data: bytes) -> tuple[str, bool]:
    """Text of the file (BOM dropped) and whether it had invalid UTF-8 (kept as surrogates, found per record)."""
    try:
        text, bad = data.decode("utf-8"), False
    except UnicodeDecodeError:
        text, bad = data.decode("utf-8", "surrogateescape"), True
    return (text[1:] if text.startswith("\ufeff") else text), bad


def _bad_utf8_fields(value: Any) -> list[str]:
    """Keys of `value` (an item decoded with surrogateescape) whose text holds bytes that are not UTF-8."""

    def bad(v: Any) -> bool:
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return True
            return False
        if isinstance(v, dict):
            return any(bad(k) or bad(x) for k, x in v.items())
        if isinstance(v, list):
            return any(bad(x) for x in v)
        return False

    if isinstance(value, dict):
        return [k.encode("utf-8", "surrogateescape").decode("utf-8", "replace") for k, v in value.items()
                if bad(k) or bad(v)]
    return ["(record)"] if bad(value) else []


def _parse_json_list(text: str, path: str) -> list[tuple[Any, int]]:
    """Parse a top-level JSON list element by element, remembering the line each element starts on.

    Element-wise parsing (json's C scanner per element) costs nothing extra and lets a syntax error name the
    record it is in, not only a line and column.
    """
    decoder = json.JSONDecoder()
    n = len(text)
    pos = 0
    ws = " \t\n\r"
    while pos < n and text[pos] in ws:
        pos += 1
    if pos == n:
        raise DataError(f"{path}: file is empty (expected a JSON list of records, or JSONL)")
    if text[pos] != "[":
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            if text[pos] == "{" and err.msg == "Extra data":
                raise _NotAList from None  # several objects: JSONL with a .json name
            raise DataError(f"{path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
        keys = f" with keys {sorted(value)[:8]}" if isinstance(value, dict) else ""
        raise DataError(
            f"{path}: top-level JSON must be a list of records, got {_type_name(value)}{keys}; "
            "write `[{...}, {...}]`, or one record per line in a .jsonl file"
        )
    items: list[tuple[Any, int]] = []
    pos += 1
    line, last = 1 + text.count("\n", 0, pos), pos  # line of `pos`, tracked incrementally

    def line_at(p: int) -> int:
        nonlocal line, last
        line, last = line + text.count("\n", last, p), p
        return line

    def skip_ws(p: int) -> int:
        while p < n and text[p] in ws:
            p += 1
        return p

    pos = skip_ws(pos)
    if pos < n and text[pos] == "]":
        raise DataError(f"{path}: the list holds no records")
    while True:
        pos = skip_ws(pos)
        if pos == n:
            after = f" after record #{len(items) - 1}" if items else ""
            raise DataError(f"{path}: invalid JSON: the list is not closed (no ']'{after}, line {line_at(pos)})")
        start_line = line_at(pos)
        if text[pos] == "]":
            raise DataError(f"{path}: invalid JSON at line {start_line}: trailing ',' after record #{len(items) - 1}")
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{path}: invalid JSON in record #{len(items)} (starting line {start_line}) at line {err.lineno} "
                f"column {err.colno}: {err.msg}"
            ) from None
        items.append((value, start_line))
        pos = skip_ws(pos)
        if pos < n and text[pos] == ",":
            pos += 1
            continue
        if pos < n and text[pos] == "]":
            break
        if pos == n:
            raise DataError(
                f"{path}: invalid JSON: the list is not closed (no ']' after record #{len(items) - 1}, "
                f"line {line_at(pos)})"
            )
        found = repr(text[pos:pos + 20])
        raise DataError(
            f"{path}: invalid JSON at line {line_at(pos)} after record #{len(items) - 1}: "
            f"expected ',' or ']' but found {found}"
        )
    pos = skip_ws(pos + 1)
    if pos < n:
        raise DataError(f"{path}: invalid JSON: extra data after the closing ']' at line {line_at(pos)}")
    return items


class _NotAList(Exception):
    pass


def _parse_jsonl(data: bytes, path: str, problems: dict[int, list[str]]) -> list[tuple[Any, int]]:
    """One record per non-blank line. Bad lines become per-record problems (so on_invalid=skip can drop them)."""
    items: list[tuple[Any, int]] = []
    loads = json.loads
    raw_lines = data.split(b"\n")
    if raw_lines and raw_lines[0].startswith(b"\xef\xbb\xbf"):
        raw_lines[0] = raw_lines[0][3:]
    for lineno, raw in enumerate(raw_lines, start=1):
        if not raw.strip():
            continue
        index = len(items)
        try:
            text, bad_utf8 = raw.decode("utf-8"), False
        except UnicodeDecodeError:
            text, bad_utf8 = raw.decode("utf-8", "surrogateescape"), True
        try:
            value = loads(text)
        except json.JSONDecodeError as err:
            problems[index] = [f"invalid JSON at column {err.colno}: {err.msg}"]
            items.append((_INVALID, lineno))
            continue
        if bad_utf8:
            problems[index] = [f"{k!r} is not valid UTF-8" for k in _bad_utf8_fields(value) or ["(line)"]]
            value = _INVALID
        items.append((value, lineno))
    if not items:
        raise DataError(f"{path}: file is empty (no records)")
    return items


_INVALID = object()


def _parse_parquet(path: str) -> list[tuple[Any, None]]:
    try:
        import pyarrow.parquet as pq  # only for parquet files (its import takes ~0.5 s)

        rows = pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: cannot read parquet: {err}") from None
    if not rows:
        raise DataError(f"{path}: file is empty (no records)")
    return [(row, None) for row in rows]


RawItems = list[tuple[Any, Optional[int]]]  # (parsed value or the invalid marker, line)


def read_raw(path: str | os.PathLike, fmt: str = "auto") -> tuple[RawItems, dict[int, list[str]], str, str]:
    """Parse a file into raw items: ([(value, line)], {index: [syntax problems]}, format, content_hash).

    File-level problems (missing, empty, not a list, broken JSON list, not UTF-8 in a JSON list) raise
    DataError. Per-line problems of JSONL are returned so that on_invalid=skip can drop those lines.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file (cwd: {os.getcwd()})")
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory, expected a .json / .jsonl / .parquet file")
    with open(path, "rb") as fh:
        data = fh.read()
    content_hash = hashlib.blake2b(data, digest_size=16).hexdigest()
    if not data.strip():
        raise DataError(f"{path}: file is empty (expected a JSON list of records, or JSONL)")
    kind = detect_format(path, data[:8], fmt)
    problems: dict[int, list[str]] = {}
    if kind == "parquet":
        items: list = _parse_parquet(path)
    elif kind == "jsonl":
        items = _parse_jsonl(data, path, problems)
    elif kind == "json":
        text, bad_utf8 = _decode_utf8(data)
        try:
            items = _parse_json_list(text, path)
        except _NotAList:
            kind = "jsonl"
            items = _parse_jsonl(data, path, problems)
        else:
            if bad_utf8:
                for index, (value, line) in enumerate(items):
                    keys = _bad_utf8_fields(value)
                    if keys:
                        problems[index] = [f"{k!r} is not valid UTF-8" for k in keys]
                        items[index] = (_INVALID, line)
                if not problems:  # outside any record (e.g. between them): a file-level problem
                    raise DataError(f"{path}: not valid UTF-8 outside the records; save the file as UTF-8")
    else:
        raise DataError(f"{path}: unknown data.format={kind!r} (auto | json | jsonl | parquet)")
    if not items:
        raise DataError(f"{path}: the list holds no records")
    return items, problems, kind, content_hash


def load_records(
    path: str | os.PathLike,
    fields: Any,
    on_invalid: str = "error",
    fmt: str = "auto",
) -> tuple[list[Record], LoadReport]:
    """Load and validate every record of `path`; map `fields` (the `data.fields` node, or a dict) onto `Record`s.

    on_invalid="error" raises DataError listing the invalid records; "skip" drops them with a warning.
    Duplicates are counted and kept (with a warning); unknown keys are ignored and counted.
    """
    if on_invalid not in ("error", "skip"):
        raise DataError(f"data.on_invalid={on_invalid!r} is not one of ['error', 'skip']")
    path = os.fspath(path)
    fq, fr, fa, fs = _field_names(fields)
    items, problems, kind, content_hash = read_raw(path, fmt)
    report = LoadReport(path=path, total=len(items), format=kind, content_hash=content_hash)
    known = {fq, fr, fa} | ({fs} if fs else set())
    extra: Counter[str] = Counter()
    records: list[Record] = []
    bad: list[str] = []
    seen: set[tuple[str, str, str]] = set()
    missing_q = 0
    key_sample: Counter[str] = Counter()
    for index, (value, line) in enumerate(items):
        where = f"#{index}" + (f" (line {line})" if line is not None else "")
        if value is _INVALID:
            bad.append(f"{where} " + ", ".join(problems[index]))
            continue
        if not isinstance(value, dict):
            bad.append(f"{where} is {_type_name(value)}, expected an object with {fq!r}, {fr!r}, {fa!r}")
            continue
        errs: list[str] = []
        texts: list[str] = []
        missing = [name for name in (fq, fr, fa) if name not in value]
        if missing:
            errs.append("missing " + ", ".join(repr(m) for m in missing))
            missing_q += fq in missing
        for name in (fq, fr, fa):
            if name in missing:
                continue
            v = value[name]
            if not isinstance(v, str):
                errs.append(f"{name!r} is {_type_name(v)}, expected a string")
                continue
            v = v.strip()
            if not v:
                errs.append(f"{name!r} is empty")
                continue
            texts.append(v)
        source = None
        if fs and value.get(fs) is not None:
            sv = value[fs]
            if isinstance(sv, str):
                source = sv.strip() or None
            else:
                errs.append(f"{fs!r} is {_type_name(sv)}, expected a string or null")
        for k in value:
            if k not in known:
                extra[k] += 1
        if len(key_sample) < 64:
            key_sample.update(value.keys())
        if errs:
            bad.append(f"{where} " + ", ".join(errs))
            continue
        rec = Record(texts[0], texts[1], texts[2], source, index, line, path)
        k = rec.key()
        if k in seen:
            report.duplicates += 1
        else:
            seen.add(k)
        records.append(rec)
    report.invalid = bad
    report.extra_fields = dict(extra)
    report.kept = len(records)
    if bad:
        head = f"{path}: {len(bad)} of {len(items)} records invalid: {_listing(bad)}"
        hint = ""
        if missing_q == len(items):  # the whole file uses other keys: say that first, list only a few
            preset = "Question" in key_sample and "Complex_CoT" in key_sample
            head = (
                f"{path}: no record has the question field {fq!r} (keys in the file: {sorted(key_sample)[:12]}); "
                "map your keys with data.fields.question/reasoning/response"
                + (" or use the preset for HuatuoGPT-o1's English schema (data=huatuo_en; "
                   "`medsft data ... --fields-preset huatuo_en`)" if preset else "")
                + f". {len(bad)} of {len(items)} records invalid: {_listing(bad[:3])}"
                + (f"; and {len(bad) - 3} more" if len(bad) > 3 else "")
            )
        if any("not valid UTF-8" in b for b in bad):
            hint += " Save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 in.json > out.json`)."
        if on_invalid == "error" or not records:
            tail = " Fix them, or set data.on_invalid=skip to drop them." if records else ""
            raise DataError(head + "." + hint + tail)
        log.warning("%s; skipped (data.on_invalid=skip)", head)
    if report.duplicates:
        log.warning(
            "%s: %d duplicate records (same question, reasoning and response as an earlier one); kept",
            path,
            report.duplicates,
        )
    if extra:
        log.info("%s: extra fields ignored: %s", path, dict(extra))
    return records, report


def _field_names(fields: Any) -> tuple[str, str, str, Optional[str]]:
    """(question, reasoning, response, source) keys of a field map (the `data.fields` node, or a dict)."""
    def get(name: str) -> Any:
        return fields.get(name)

    names = tuple(get(n) for n in ("question", "reasoning", "response"))
    for n, v in zip(("question", "reasoning", "response"), names):
        if not v or not isinstance(v, str):
            raise DataError(f"data.fields.{n}={v!r} must name a record key")
    return names[0], names[1], names[2], get("source") or None


def records_key(records: Iterable[Record]) -> str:
    """A short hash of which records (by file index) were selected; part of the cache key."""
    h = hashlib.blake2b(digest_size=12)
    for r in records:
        h.update(r.index.to_bytes(8, "little"))
    return h.hexdigest()
