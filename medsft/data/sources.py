"""Where records come from: a local JSON / JSONL / Parquet / Arrow file, a `datasets` folder (`save_to_disk`, or
data files the `datasets` library reads) or a Hugging Face Hub dataset id. Each is read as a stream of raw items
(parsed values, in order, with their line and byte span), so no reader ever holds the whole file as Python
objects; and each reads any item again by index (`read`), for the tokenizing workers and the held-out records.

Why our own JSON reader and not `datasets.load_dataset("json")`: pyarrow's JSON reader stops at the first bad
line of a file without a record index or line, infers one schema for the whole file (a record with a number
where text is expected fails or is silently coerced) and writes an Arrow copy of every file. We need
per-record, per-line messages. The reader here parses a JSON list element by element from a sliding window of
the file (json's C scanner per element), so memory stays at a few MB whatever the file's size, and a syntax
error names the record it is in. Columnar files go through pyarrow (typed already); folders and Hub ids through
`datasets` (memory-mapped Arrow).
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import re
from bisect import bisect_right
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Optional, Sequence

import numpy as np

from medsft.data.base import surrogate_at, type_name
from medsft.errors import DataError
from medsft.paths import in_project

FILE_TYPES = ("auto", "json", "jsonl", "parquet", "arrow")
CHUNK_BYTES = 1 << 22  # read size of the streaming readers (4 MiB)
BATCH_ROWS = 1024  # rows per batch read from columnar sources
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_DATA_SUFFIXES = (".json", ".jsonl", ".ndjson", ".parquet", ".pq", ".arrow", ".csv", ".txt", ".tsv")
_ENCODING_HINT = "save it as UTF-8 (e.g. `iconv -f UTF-16 -t UTF-8 in.json > out.json`)"
_SURROGATE_CHAR = re.compile("[\ud800-\udfff]")
INVALID = object()  # the value of an item that could not be parsed (its problems say why)


class RawItem(NamedTuple):
    index: int
    value: Any  # the parsed value, or INVALID
    line: Optional[int]  # 1-based line where the item starts (JSON / JSONL)
    problems: Optional[list]  # why the item is INVALID; None when parsed
    start: int  # byte span in the file (JSON / JSONL), else -1
    end: int
    bad_bytes: Optional[bool]  # True: bytes that are not UTF-8 (kept as surrogates); False: the text may hold
    # lone surrogates (\ud800 escapes); None: it provably holds no surrogate (no such escape, Arrow strings)


def _escapes_surrogate(text: str, start: int = 0, end: Optional[int] = None) -> bool:
    """Whether JSON text may decode to a lone surrogate: it holds a \\uD800-\\uDFFF escape."""
    end = len(text) if end is None else end
    if text.find("\\u", start, end) < 0:  # no escape at all: the usual case
        return False
    return text.find("\\ud", start, end) >= 0 or text.find("\\uD", start, end) >= 0


@dataclass(frozen=True)
class SourceSpec:
    """What to open (picklable, so tokenizing workers open the same source): `path` as the user gave it."""

    path: str
    file_type: str = "auto"
    split: Optional[str] = None
    subset: Optional[str] = None
    revision: Optional[str] = None
    hf_cache_dir: Optional[str] = None  # where `datasets` prepares a local data folder (data.cache_dir/hf)
    what: str = "data.path"  # the config key that named it (for messages)


def file_type_of(path: str, head: bytes, file_type: str = "auto") -> str:
    """json | jsonl | parquet | arrow, from the extension, else from the first bytes."""
    if file_type != "auto":
        return file_type
    lower = path.lower()
    if lower.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    if lower.endswith((".parquet", ".pq")) or head[:4] == b"PAR1":
        return "parquet"
    if lower.endswith(".arrow") or head[:6] == b"ARROW1" or head[:4] == b"\xff\xff\xff\xff":
        return "arrow"
    # .json or anything else: a list is JSON; an object at the start may be JSONL (checked while parsing).
    return "json"


def _encoding_problem(path: str, head: bytes) -> Optional[str]:
    """A message for files that are not UTF-8 text at all (UTF-16/32), judged from the first bytes."""
    boms = {b"\xff\xfe\x00\x00": "UTF-32", b"\x00\x00\xfe\xff": "UTF-32", b"\xff\xfe": "UTF-16",
            b"\xfe\xff": "UTF-16"}
    for bom, name in boms.items():
        if head.startswith(bom):
            return f"{path}: the file is {name} encoded (it starts with a {name} byte-order mark); {_ENCODING_HINT}"
    sample = head[:4096]
    if sample and sample.count(0) > len(sample) // 8:
        return (f"{path}: the file holds NUL bytes ({sample.count(0)} in its first {len(sample)}): it looks UTF-16 or "
                f"UTF-32 encoded, not UTF-8 text; {_ENCODING_HINT}")
    return None


def _open_binary(path: str):
    try:
        return open(path, "rb")
    except PermissionError as err:
        raise DataError(f"{path}: cannot be read ({err.strerror}); check its permissions (ls -l {path})") from None
    except OSError as err:
        raise DataError(f"{path}: cannot be read ({err.strerror or err})") from None


def _hash_file(path: str, h: Optional[Any] = None) -> str:
    h = h or hashlib.blake2b(digest_size=16)
    with _open_binary(path) as fh:
        for block in iter(lambda: fh.read(CHUNK_BYTES), b""):
            h.update(block)
    return h.hexdigest()


class Source:
    """A stream of raw items with random access by index. `kind`: json | jsonl | parquet | arrow | dataset."""

    kind = ""

    def __init__(self, spec: SourceSpec, path: str):
        self.spec = spec
        self.path = path  # as shown in messages
        self._hash = ""  # set by `items()` once read to the end (files), else computed when first asked

    @property
    def content_hash(self) -> str:
        """Identity of the source's content: blake2b of a file's bytes (of a folder's files), or a Hub dataset's
        id, split, revision and `datasets` fingerprint."""
        if not self._hash:
            self._hash = self._compute_hash()
        return self._hash

    def _compute_hash(self) -> str:
        return _hash_file(self.path)

    def items(self) -> Iterator[RawItem]:
        raise NotImplementedError

    def read(self, indices: Sequence[int], starts: Optional[np.ndarray] = None, ends: Optional[np.ndarray] = None,
             lines: Optional[np.ndarray] = None) -> list[RawItem]:
        """The items at `indices` (sorted), given the byte spans and lines `items()` reported for them."""
        raise NotImplementedError

    def stamp(self) -> Optional[tuple]:
        """(size, mtime) of a local file, to notice it changing between two reads; None otherwise."""
        return None

    def __getstate__(self) -> dict:  # workers reopen the source from its spec
        return {"spec": self.spec}

    def __setstate__(self, state: dict) -> None:
        fresh = open_source(state["spec"])
        self.__dict__.update(fresh.__dict__)


# ------------------------------------------------------------------------------------------------ JSON / JSONL


class _FileSource(Source):
    def __init__(self, spec: SourceSpec, path: str, cr_only: bool):
        super().__init__(spec, path)
        self.cr_only = cr_only

    def stamp(self) -> Optional[tuple]:
        st = os.stat(self.path)
        return (st.st_size, st.st_mtime_ns)


class JsonlSource(_FileSource):
    """One record per non-blank line. Bad lines become per-record problems (so on_invalid=skip can drop them)."""

    kind = "jsonl"

    def items(self) -> Iterator[RawItem]:
        if self.cr_only:
            raise DataError(
                f"{self.path}: the file's lines end with a carriage return only (CR, old Mac style), so it reads as "
                "one line; convert the line endings to \\n (e.g. `tr '\\r' '\\n' < in.jsonl > out.jsonl`)"
            )
        h = hashlib.blake2b(digest_size=16)
        index, offset = 0, 0
        with _open_binary(self.path) as fh:
            for lineno, raw in enumerate(fh, start=1):
                h.update(raw)
                start, offset = offset, offset + len(raw)
                if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                    raw, start = raw[3:], start + 3
                if not raw.strip():
                    continue
                yield _jsonl_item(raw, index, lineno, start, offset)
                index += 1
        if index == 0:
            raise DataError(f"{self.path}: file is empty (no records)")
        self._hash = h.hexdigest()

    def read(self, indices, starts=None, ends=None, lines=None) -> list[RawItem]:
        if starts is None:
            return _read_by_scan(self, indices)
        out = []
        with _open_binary(self.path) as fh:
            for i, (index, a, b) in enumerate(zip(indices, starts, ends)):
                fh.seek(int(a))
                out.append(_jsonl_item(fh.read(int(b) - int(a)), int(index), None if lines is None else int(lines[i]),
                                       int(a), int(b)))
        return out


def _jsonl_item(raw: bytes, index: int, lineno: Optional[int], start: int, end: int) -> RawItem:
    try:
        text = raw.decode("utf-8")
        bad = False if _escapes_surrogate(text) else None
    except UnicodeDecodeError:
        text, bad = raw.decode("utf-8", "surrogateescape"), True
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        return RawItem(index, INVALID, lineno, [f"invalid JSON at column {err.colno}: {err.msg}"], start, end, bad)
    except RecursionError:
        return RawItem(index, INVALID, lineno, ["nested too deeply to parse (JSON arrays/objects inside one another "
                                                "hundreds of levels deep)"], start, end, bad)
    return RawItem(index, value, lineno, None, start, end, bad)


class _NotAList(Exception):
    pass


class JsonListSource(_FileSource):
    """A top-level JSON list of records, parsed element by element from a sliding window of the file."""

    kind = "json"

    def items(self) -> Iterator[RawItem]:
        reader = _JsonWindow(self.path, "\r" if self.cr_only else "\n")
        try:
            yield from reader.items()
        except _NotAList:
            # Several objects one after another: JSONL with a .json name.
            self.__class__ = JsonlSource
            self.kind = "jsonl"
            yield from JsonlSource.items(self)
            return
        self._hash = reader.hash.hexdigest()

    def read(self, indices, starts=None, ends=None, lines=None) -> list[RawItem]:
        if starts is None:
            return _read_by_scan(self, indices)
        out = []
        with _open_binary(self.path) as fh:
            # Runs of neighbouring records are read in one go (the workers' chunks are contiguous).
            k = 0
            while k < len(indices):
                j = k
                while j + 1 < len(indices) and int(starts[j + 1]) - int(ends[j]) < 4096 and \
                        int(ends[j + 1]) - int(starts[k]) < (64 << 20):
                    j += 1
                base = int(starts[k])
                fh.seek(base)
                block = fh.read(int(ends[j]) - base)
                for m in range(k, j + 1):
                    raw = block[int(starts[m]) - base:int(ends[m]) - base]
                    text = raw.decode("utf-8", "surrogateescape")
                    value = json.loads(text)
                    bad = True if surrogate_at(text) >= 0 else (False if _escapes_surrogate(text) else None)
                    out.append(RawItem(int(indices[m]), value, None if lines is None else int(lines[m]),
                                       None, int(starts[m]), int(ends[m]), bad))
                k = j + 1
        return out


class _JsonWindow:
    """The element-by-element parser of a JSON list over a window of the file's decoded text."""

    def __init__(self, path: str, newline: str):
        self.path = path
        self.nl = newline
        self.hash = hashlib.blake2b(digest_size=16)
        self.fh = None
        self.decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
        self.buf = ""
        self.eof = False
        self.pos = 0  # cursor in buf
        self.byte = 0  # file byte offset of the cursor
        self.line = 1  # line of the cursor
        self.base_line = 1  # line of buf[0]
        self.base_col = 1  # column of buf[0]
        self.scan = json.JSONDecoder().raw_decode
        self.dirty = False  # the text read so far held bytes that are not UTF-8

    # ---------------------------------------------------------------------------------------- the window
    def _more(self, at_least: int = 0) -> bool:
        if self.eof:
            return False
        data = self.fh.read(max(CHUNK_BYTES, at_least))
        self.hash.update(data)
        if not data:
            self.eof = True
            self.buf += self.decoder.decode(b"", final=True)
            return False
        text = self.decoder.decode(data)
        if not self.dirty:  # bytes that are not UTF-8 somewhere in this block (kept as surrogates)
            self.dirty = surrogate_at(text) >= 0
        self.buf += text
        return True

    def _advance(self, to: int) -> None:
        piece = self.buf[self.pos:to]
        self.byte += len(piece) if piece.isascii() else len(piece.encode("utf-8", "surrogateescape"))
        self.line += piece.count(self.nl)
        self.pos = to
        if self.pos > CHUNK_BYTES and self.pos * 2 > len(self.buf):  # drop what is behind the cursor
            head = self.buf[:self.pos]
            nl = head.rfind(self.nl)
            self.base_line += head.count(self.nl)
            self.base_col = (self.pos - nl) if nl >= 0 else self.base_col + self.pos
            self.buf = self.buf[self.pos:]
            self.pos = 0

    def _skip_ws(self) -> bool:
        """Move past whitespace; False at the end of the file."""
        if self.pos < len(self.buf) and self.buf[self.pos] not in " \t\n\r":
            return True
        while True:
            n = len(self.buf)
            p = self.pos
            while p < n and self.buf[p] in " \t\n\r":
                p += 1
            self._advance(p)
            if self.pos < len(self.buf):
                return True
            if not self._more():
                return self.pos < len(self.buf)

    def _where(self, p: int) -> tuple[int, int]:
        """(line, column) of buf position p."""
        head = self.buf[:p]
        nl = head.rfind(self.nl)
        line = self.base_line + head.count(self.nl)
        col = p - nl if nl >= 0 else self.base_col + p
        return line, col

    def _value(self) -> tuple[Any, int]:
        """Parse the value at the cursor, reading more of the file while it is incomplete; (value, end)."""
        while True:
            try:
                value, end = self.scan(self.buf, self.pos)
            except json.JSONDecodeError as err:
                incomplete = err.msg.startswith("Unterminated string") or err.pos >= len(self.buf) - 8
                if incomplete and self._more(len(self.buf)):
                    continue
                raise
            if end >= len(self.buf) and not self.eof and self._more():
                continue  # a number may go on in the next block
            return value, end

    # ---------------------------------------------------------------------------------------- the grammar
    def items(self) -> Iterator[RawItem]:
        path = self.path
        self.fh = _open_binary(path)
        try:
            if not self._skip_ws():
                raise DataError(f"{path}: file is empty (expected a JSON list of records, or JSONL)")
            if self.buf.startswith("\ufeff"):
                self._advance(1)
                if not self._skip_ws():
                    raise DataError(f"{path}: file is empty (expected a JSON list of records, or JSONL)")
            if self.buf[self.pos] != "[":
                self._not_a_list()
            self._advance(self.pos + 1)
            if not self._skip_ws():
                raise DataError(f"{path}: invalid JSON: the list is not closed (no ']', line {self.line})")
            if self.buf[self.pos] == "]":
                raise DataError(f"{path}: the list holds no records")
            index = 0
            while True:
                if not self._skip_ws():
                    after = f" after record #{index - 1}" if index else ""
                    raise DataError(f"{path}: invalid JSON: the list is not closed (no ']'{after}, line {self.line})")
                if self.buf[self.pos] == "]":
                    raise DataError(f"{path}: invalid JSON at line {self.line}: trailing ',' after record #{index - 1}")
                start_line, start_byte, start = self.line, self.byte, self.pos
                try:
                    value, end = self._value()
                except json.JSONDecodeError as err:
                    line, col = self._where(err.pos)
                    raise DataError(f"{path}: invalid JSON in record #{index} (starting line {start_line}) at line "
                                    f"{line} column {col}: {err.msg}") from None
                except RecursionError:
                    raise DataError(f"{path}: record #{index} (starting line {start_line}) is nested too deeply to "
                                    "parse (arrays/objects inside one another hundreds of levels deep)") from None
                start = self.pos  # the window may have moved while reading more
                bad = True if self.dirty and _SURROGATE_CHAR.search(self.buf, start, end) else (
                    False if _escapes_surrogate(self.buf, start, end) else None)
                self._advance(end)
                yield RawItem(index, value, start_line, None, start_byte, self.byte, bad)
                index += 1
                if not self._skip_ws():
                    raise DataError(f"{path}: invalid JSON: the list is not closed (no ']' after record #{index - 1}, "
                                    f"line {self.line})")
                c = self.buf[self.pos]
                if c == ",":
                    self._advance(self.pos + 1)
                    continue
                if c == "]":
                    break
                if surrogate_at(c) >= 0:
                    raise DataError(f"{path}: not valid UTF-8 outside the records (line {self.line}); save the file "
                                    "as UTF-8")
                found = repr(self.buf[self.pos:self.pos + 20])
                raise DataError(f"{path}: invalid JSON at line {self.line} after record #{index - 1}: expected ',' "
                                f"or ']' but found {found}")
            self._advance(self.pos + 1)
            if self._skip_ws():
                raise DataError(f"{path}: invalid JSON: extra data after the closing ']' at line {self.line}")
        finally:
            self.fh.close()

    def _not_a_list(self) -> None:
        path = self.path
        try:
            value, end = self._value()
        except json.JSONDecodeError as err:
            line, col = self._where(err.pos)
            raise DataError(f"{path}: invalid JSON at line {line} column {col}: {err.msg}") from None
        except RecursionError:
            raise DataError(f"{path}: the JSON is nested too deeply to parse") from None
        self._advance(end)
        if isinstance(value, dict) and self._skip_ws():
            raise _NotAList  # several objects: JSONL with a .json name
        keys = f" with keys {sorted(value)[:8]}" if isinstance(value, dict) else ""
        raise DataError(
            f"{path}: top-level JSON must be a list of records, got {type_name(value)}{keys}; "
            "write `[{...}, {...}]`, or one record per line in a .jsonl file"
        )


def _read_by_scan(source: Source, indices: Sequence[int]) -> list[RawItem]:
    wanted = set(int(i) for i in indices)
    return [item for item in source.items() if item.index in wanted]


# ------------------------------------------------------------------------------------------------ columnar


class _TableSource(Source):
    """Rows of a pyarrow Table (memory-mapped where the format allows)."""

    def _items_of(self, batches, start_index: int = 0) -> Iterator[RawItem]:
        index = start_index
        for batch in batches:
            for row in batch.to_pylist():
                yield RawItem(index, row, None, None, -1, -1, None)
                index += 1


class ParquetSource(_TableSource):
    kind = "parquet"

    def __init__(self, spec: SourceSpec, path: str):
        super().__init__(spec, path)
        import pyarrow.parquet as pq  # columnar sources only (pyarrow's import takes ~0.5 s)

        try:
            self.file = pq.ParquetFile(path)
        except Exception as err:  # pyarrow raises several types for corrupt files
            raise DataError(f"{path}: cannot read parquet: {err}") from None
        meta = self.file.metadata
        self.group_starts = np.cumsum([0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
        if meta.num_rows == 0:
            raise DataError(f"{path}: file is empty (no records)")

    def stamp(self) -> Optional[tuple]:
        st = os.stat(self.path)
        return (st.st_size, st.st_mtime_ns)

    def items(self) -> Iterator[RawItem]:
        try:
            yield from self._items_of(self.file.iter_batches(batch_size=BATCH_ROWS))
        except DataError:
            raise
        except Exception as err:
            raise DataError(f"{self.path}: cannot read parquet: {err}") from None

    def read(self, indices, starts=None, ends=None, lines=None) -> list[RawItem]:
        out, cached = [], {}
        for index in indices:
            g = bisect_right(self.group_starts, int(index)) - 1
            if g not in cached:
                cached.clear()
                cached[g] = self.file.read_row_group(g).to_pylist()
            out.append(RawItem(int(index), cached[g][int(index) - int(self.group_starts[g])], None, None, -1, -1,
                               None))
        return out


class ArrowSource(_TableSource):
    kind = "arrow"

    def __init__(self, spec: SourceSpec, path: str):
        super().__init__(spec, path)
        import pyarrow as pa  # columnar sources only (pyarrow's import takes ~0.5 s)

        try:
            mm = pa.memory_map(path)
            try:
                self.table = pa.ipc.open_file(mm).read_all()
            except pa.ArrowInvalid:
                mm.seek(0)
                self.table = pa.ipc.open_stream(mm).read_all()  # what `datasets` writes
        except Exception as err:
            raise DataError(f"{path}: cannot read Arrow: {err}") from None
        if self.table.num_rows == 0:
            raise DataError(f"{path}: file is empty (no records)")

    def stamp(self) -> Optional[tuple]:
        st = os.stat(self.path)
        return (st.st_size, st.st_mtime_ns)

    def items(self) -> Iterator[RawItem]:
        yield from self._items_of(self.table.to_batches(max_chunksize=BATCH_ROWS))

    def read(self, indices, starts=None, ends=None, lines=None) -> list[RawItem]:
        import pyarrow as pa  # columnar sources only (pyarrow's import takes ~0.5 s)

        rows = self.table.take(pa.array(np.asarray(indices, dtype=np.int64))).to_pylist()
        return [RawItem(int(i), row, None, None, -1, -1, None) for i, row in zip(indices, rows)]


class DatasetSource(Source):
    """A `datasets.Dataset`: a `save_to_disk` folder, a folder of data files, or a Hub dataset id."""

    kind = "dataset"

    def __init__(self, spec: SourceSpec, path: str, dataset: Any, hasher):
        super().__init__(spec, path)
        self.dataset = dataset
        self._hasher = hasher
        if len(dataset) == 0:
            raise DataError(f"{path}: the dataset holds no records (split {spec.split!r})")

    def _compute_hash(self) -> str:
        return self._hasher()

    def items(self) -> Iterator[RawItem]:
        index = 0
        for batch in self.dataset.iter(batch_size=BATCH_ROWS):
            names = list(batch)
            for values in zip(*(batch[n] for n in names)):
                yield RawItem(index, dict(zip(names, values)), None, None, -1, -1, None)
                index += 1

    def read(self, indices, starts=None, ends=None, lines=None) -> list[RawItem]:
        batch = self.dataset[[int(i) for i in indices]]
        names = list(batch)
        return [RawItem(int(i), dict(zip(names, values)), None, None, -1, -1, None)
                for i, values in zip(indices, zip(*(batch[n] for n in names)))]


def _folder_hash(folder: Path, extra: str = "") -> str:
    h = hashlib.blake2b(extra.encode(), digest_size=16)
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(folder)).encode())
        _hash_file(str(f), h)
    return h.hexdigest()


def _pick_split(obj: Any, spec: SourceSpec, path: str) -> Any:
    from datasets import DatasetDict  # folders and Hub ids only (datasets' import takes ~1 s)

    if isinstance(obj, DatasetDict):
        if spec.split not in obj:
            raise DataError(f"{path}: no split {spec.split!r} (splits: {sorted(obj)}); set "
                            f"{spec.what.rsplit('.', 1)[0]}.split to one of them")
        return obj[spec.split]
    return obj


def _open_dataset_folder(spec: SourceSpec, folder: Path) -> Source:
    import datasets  # folders and Hub ids only (datasets' import takes ~1 s)

    path = str(folder)
    if (folder / "state.json").exists() or (folder / "dataset_dict.json").exists():
        try:
            obj = datasets.load_from_disk(path)
        except Exception as err:
            raise DataError(f"{path}: cannot read the `save_to_disk` folder: {err}") from None
        return DatasetSource(spec, path, _pick_split(obj, spec, path), lambda: _folder_hash(folder))
    files = [p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")]
    if not files:
        raise DataError(f"{path}: is a directory with no data files (expected a .json / .jsonl / .parquet / .arrow "
                        "file, a `save_to_disk` folder, or a folder of data files)")
    dataset = _load_dataset(spec, path, local=True)
    return DatasetSource(spec, path, dataset, lambda: _folder_hash(folder, f"{spec.split}/{spec.subset}"))


def _load_dataset(spec: SourceSpec, path: str, local: bool) -> Any:
    import datasets  # folders and Hub ids only (datasets' import takes ~1 s)

    offline = any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on")
                  for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    kwargs = {"split": spec.split, "name": spec.subset, "revision": spec.revision}
    if local and spec.hf_cache_dir:
        kwargs["cache_dir"] = spec.hf_cache_dir
    try:
        obj = datasets.load_dataset(path, **kwargs)
    except (ValueError, KeyError) as err:
        text = str(err)
        if "split" in text.lower():
            raise DataError(f"{path}: {text} (set {spec.what.rsplit('.', 1)[0]}.split)") from None
        raise DataError(f"{path}: cannot load the dataset: {text}") from None
    except Exception as err:  # datasets / huggingface_hub raise many types (connection, not found, gated)
        name = type(err).__name__
        if local:
            raise DataError(f"{path}: cannot load the folder's data files with `datasets`: {name}: {err}") from None
        if offline or "offline" in str(err).lower() or "connect" in str(err).lower():
            raise DataError(
                f"{path}: not a local file or folder, and the Hub dataset is not in the local cache while offline "
                "(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE, or no network): download it once with network access, or "
                f"give a local path ({name}: {str(err).splitlines()[0] if str(err) else ''})"
            ) from None
        raise DataError(f"{path}: not a local file or folder, and not a loadable Hub dataset ({name}: {err})") from None
    return _pick_split(obj, spec, path)


def _open_hub(spec: SourceSpec) -> Source:
    dataset = _load_dataset(spec, spec.path, local=False)
    fingerprint = getattr(dataset, "_fingerprint", "") or ""
    key = f"hub:{spec.path}:{spec.subset}:{spec.split}:{spec.revision}:{fingerprint}"
    return DatasetSource(spec, spec.path, dataset, lambda: hashlib.blake2b(key.encode(), digest_size=16).hexdigest())


def resolve_local(path: str) -> Optional[Path]:
    """The local file or folder `path` names (as given, else relative to the project), or None."""
    p = in_project(path)
    return p if p.exists() else None


def looks_like_hub_id(path: str) -> bool:
    return bool(_HUB_ID.match(path)) and not path.lower().endswith(_DATA_SUFFIXES) and not path.startswith(".")


def open_source(spec: SourceSpec) -> Source:
    """The source `spec.path` names: a local file, a local folder, else a Hub dataset id."""
    raw = spec.path
    if raw is None or str(raw) in ("", "???"):
        raise DataError(f"{spec.what} is not set; pass {spec.what}=/path/to/records.json (or .jsonl)")
    if spec.file_type not in FILE_TYPES:
        raise DataError(f"{spec.what}: unknown file type {spec.file_type!r} (one of {', '.join(FILE_TYPES)})")
    local = resolve_local(str(raw))
    if local is None:
        if looks_like_hub_id(str(raw)):
            return _open_hub(spec)
        raise DataError(f"{raw}: no such file (cwd: {os.getcwd()})")
    if local.is_dir():
        return _open_dataset_folder(spec, local)
    path = str(local)
    with _open_binary(path) as fh:
        head = fh.read(65536)
    if not head.strip():
        raise DataError(f"{path}: file is empty (expected a JSON list of records, or JSONL)")
    kind = file_type_of(path, head, spec.file_type)
    if kind in ("json", "jsonl"):
        problem = _encoding_problem(path, head)
        if problem:
            raise DataError(problem)
        cr_only = b"\r" in head and b"\n" not in head
        return (JsonlSource if kind == "jsonl" else JsonListSource)(spec, path, cr_only)
    if kind == "parquet":
        return ParquetSource(spec, path)
    return ArrowSource(spec, path)
