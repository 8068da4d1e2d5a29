"""The tokenized data on disk and in memory: flat token ids (uint16 when the vocabulary has at most 65 536 entries,
else int32) with int64 offsets, the loss spans of every example, and the source index of each; one file per cache entry, memory-mapped by every process that reads it
(numpy), so N processes on a node share one copy in the page cache instead of holding N copies as Python lists.

An entry is two files: `<key>.tok`, a small manifest naming its payload, and the payload `<key>.<uid>.bin`,
written front to back while tokenizing (so no array is ever held whole in memory):

    ids (uint16 | int32) | offsets (int64, n+1) | span_offsets (int64, n+1) | spans (int32, [m, 2]) | index (int64, n)
    | footer (JSON: where each array starts, its dtype and shape) | footer length (uint64) | b"MEDSFTTK"

A payload is never written again once complete (a rebuilt entry gets a new payload and the manifest is replaced
atomically), so a process that maps it can never see it change or shrink under its mapping.

`Examples` is what the training loop indexes (`data.train[i]` -> {"input_ids", "labels"} as lists, built on
access from the mapped arrays): the stores it draws from, and for each example its store, row and kept length.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from medsft.data.render import labels_for

log = logging.getLogger(__name__)

MAGIC = b"MEDSFTTK"
LAYOUT_VERSION = 1
_ORDER = ("ids", "offsets", "span_offsets", "spans", "index")


class TokenStore:
    """Tokenized examples: row r has ids[offsets[r]:offsets[r+1]] and loss spans
    spans[span_offsets[r]:span_offsets[r+1]] (each [start, end) in the row), and came from source record index[r]."""

    def __init__(self, ids: np.ndarray, offsets: np.ndarray, span_offsets: np.ndarray, spans: np.ndarray,
                 index: np.ndarray, path: Optional[Path] = None, meta: Optional[dict] = None):
        self.ids, self.offsets, self.span_offsets, self.spans, self.index = ids, offsets, span_offsets, spans, index
        self.path = path
        self.meta = meta or {}

    def __len__(self) -> int:
        return len(self.index)

    @property
    def tokens(self) -> int:
        return int(self.offsets[-1]) if len(self.offsets) else 0

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def first_starts(self) -> np.ndarray:
        """Where the first loss span of each row starts (its prompt length)."""
        return self.spans[self.span_offsets[:-1], 0].astype(np.int64)

    def last_spans(self) -> tuple[np.ndarray, np.ndarray]:
        """(start, end) of each row's last loss span."""
        last = self.spans[self.span_offsets[1:] - 1]
        return last[:, 0].astype(np.int64), last[:, 1].astype(np.int64)

    def row_ids(self, row: int, end: Optional[int] = None) -> np.ndarray:
        a = int(self.offsets[row])
        b = int(self.offsets[row + 1]) if end is None else a + end
        return self.ids[a:b]

    def row_spans(self, row: int) -> np.ndarray:
        return self.spans[int(self.span_offsets[row]):int(self.span_offsets[row + 1])]

    @classmethod
    def from_rendered(cls, rendered: Sequence[Any], index: Sequence[int]) -> "TokenStore":
        """An in-memory store of `medsft.data.render.Rendered` conversations."""
        w = _Arrays()
        for r in rendered:
            w.add_one(r)
        return w.store(np.asarray(index, dtype=np.int64))

    @classmethod
    def open(cls, path: Path) -> Optional["TokenStore"]:
        """The entry whose manifest is `path`, memory-mapped; None (with a warning) if it is not a complete entry."""
        try:
            manifest = json.loads(Path(path).read_text(encoding="utf-8"))
            if not isinstance(manifest, dict) or manifest.get("magic") != MAGIC.decode():
                raise ValueError("not a medsft token store")
            payload = Path(path).parent / manifest["payload"]
            store = cls._open_payload(payload)
            if os.path.getsize(payload) != manifest.get("size"):
                raise ValueError(f"{payload.name} has {os.path.getsize(payload)} bytes, expected {manifest.get('size')}")
            store.path = Path(path)
            return store
        except Exception as err:  # corrupt, truncated or foreign file: the caller rebuilds it
            log.warning("ignoring unreadable data cache %s (%s); rebuilding", path, err)
            return None

    @classmethod
    def _open_payload(cls, path: Path) -> "TokenStore":
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            if size < 16:
                raise ValueError("too short")
            fh.seek(size - 16)
            tail = fh.read(16)
            if tail[8:] != MAGIC:
                raise ValueError("not a medsft token store")
            n_footer = int.from_bytes(tail[:8], "little")
            fh.seek(size - 16 - n_footer)
            footer = json.loads(fh.read(n_footer))
        if footer.get("layout") != LAYOUT_VERSION:
            raise ValueError(f"layout {footer.get('layout')} (expected {LAYOUT_VERSION})")
        arrays = {}
        for name in _ORDER:
            offset, dtype, shape = footer["arrays"][name]
            count = int(np.prod(shape))
            if offset + count * np.dtype(dtype).itemsize > size - 16 - n_footer:
                raise ValueError(f"{name} runs past the end of the file")
            arrays[name] = (np.zeros(shape, dtype=dtype) if count == 0 else
                            np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=tuple(shape)))
        store = cls(**arrays, path=Path(path), meta=footer.get("meta", {}))
        n = len(store.index)
        if (len(store.offsets) != n + 1 or len(store.span_offsets) != n + 1 or int(store.offsets[-1]) != len(store.ids)
                or int(store.span_offsets[-1]) != len(store.spans)):
            raise ValueError("inconsistent array sizes")
        return store


def id_dtype(vocab_size: int) -> str:
    """The smallest dtype that holds every token id of a vocabulary: 2 bytes per token where it fits."""
    return "<u2" if vocab_size <= 1 << 16 else "<i4"


class _Arrays:
    """Accumulates rows (per batch) for a store: the small arrays in memory, the ids in a file or a list."""

    def __init__(self, sink=None, ids_dtype: str = "<i4"):
        self.sink = sink  # a binary file for the ids, else kept in memory
        self.ids_dtype = np.dtype(ids_dtype)
        self.id_parts: list[np.ndarray] = []
        self.lengths: list[np.ndarray] = []
        self.n_spans: list[np.ndarray] = []
        self.spans: list[np.ndarray] = []
        self.index: list[np.ndarray] = []
        self.n_ids = 0

    def add(self, ids: np.ndarray, lengths: np.ndarray, spans: np.ndarray, n_spans: np.ndarray,
            index: np.ndarray) -> None:
        if len(ids) and self.ids_dtype.itemsize < 4 and int(np.max(ids)) >= 1 << 16:
            raise ValueError(f"token id {int(np.max(ids))} does not fit {self.ids_dtype}")
        ids = np.ascontiguousarray(ids, dtype=self.ids_dtype)
        if self.sink is not None:
            self.sink.write(ids.tobytes())
        else:
            self.id_parts.append(ids)
        self.n_ids += len(ids)
        self.lengths.append(np.asarray(lengths, dtype=np.int64))
        self.spans.append(np.asarray(spans, dtype=np.int32).reshape(-1, 2))
        self.n_spans.append(np.asarray(n_spans, dtype=np.int64))
        self.index.append(np.asarray(index, dtype=np.int64))

    def add_one(self, r: Any) -> None:
        spans = r.loss_spans()
        self.add(np.asarray(r.ids, dtype=np.int32), np.array([len(r.ids)]), np.array(spans, dtype=np.int32),
                 np.array([len(spans)]), np.zeros(1, dtype=np.int64))

    def tables(self) -> dict[str, np.ndarray]:
        def cat(parts, dtype, shape_tail=()):
            return np.concatenate(parts) if parts else np.zeros((0,) + shape_tail, dtype=dtype)

        offsets = np.zeros(sum(len(x) for x in self.lengths) + 1, dtype=np.int64)
        np.cumsum(cat(self.lengths, np.int64), out=offsets[1:])
        span_offsets = np.zeros(len(offsets), dtype=np.int64)
        np.cumsum(cat(self.n_spans, np.int64), out=span_offsets[1:])
        return {"offsets": offsets, "span_offsets": span_offsets, "spans": cat(self.spans, np.int32, (2,)),
                "index": cat(self.index, np.int64)}

    def store(self, index: Optional[np.ndarray] = None) -> TokenStore:
        t = self.tables()
        ids = np.concatenate(self.id_parts) if self.id_parts else np.zeros(0, dtype=self.ids_dtype)
        return TokenStore(ids, t["offsets"], t["span_offsets"], t["spans"], t["index"] if index is None else index)


class StoreWriter:
    """Writes a store file atomically (a temporary file in the same folder, renamed when complete), or keeps the
    rows in memory: when `path` is None, or when the file cannot be written (read-only or full disk: training
    still works, just not cached)."""

    def __init__(self, path: Optional[Path], meta: Optional[dict] = None, ids_dtype: str = "<i4"):
        self.path = Path(path) if path is not None else None  # the manifest
        self.meta = meta or {}
        self.tmp: Optional[str] = None
        self.fh = None
        if self.path is not None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd, self.tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f"{self.path.stem}.", suffix=".tmp")
                self.fh = os.fdopen(fd, "wb")
            except OSError as err:
                log.warning("could not write the data cache %s: %s", self.path, err)
                self.path = None
        self.arrays = _Arrays(self.fh, ids_dtype)

    def add(self, ids, lengths, spans, n_spans, index) -> None:
        if self.fh is not None:
            try:
                self.arrays.add(ids, lengths, spans, n_spans, index)
                return
            except OSError as err:
                self._to_memory(err)
        self.arrays.add(ids, lengths, spans, n_spans, index)

    def _to_memory(self, err: OSError) -> None:
        log.warning("could not write the data cache %s: %s; keeping the tokens in memory", self.path, err)
        written = self.arrays.n_ids
        try:
            self.fh.close()
        except OSError:
            pass
        self.arrays.id_parts = [np.fromfile(self.tmp, dtype=self.arrays.ids_dtype, count=written)] if written else []
        self.arrays.sink = None
        self.fh = None
        self.abort()
        self.path = None

    def finish(self, path: Optional[Path] = None) -> TokenStore:
        """Complete the file, rename it into place (as `path`, a manifest in the same folder, when the entry's name
        is known only now) and map it; the in-memory store when there is no file."""
        if path is not None and self.path is not None:
            self.path = Path(path)
        if self.fh is not None:
            try:
                self._complete()
            except OSError as err:
                self._to_memory(err)
            else:
                store = TokenStore.open(self.path)
                if store is not None:
                    return store
                raise OSError(f"the data cache {self.path} just written cannot be read back")
        return self.arrays.store()

    def _complete(self) -> None:
        fh = self.fh
        layout = {"ids": [0, self.arrays.ids_dtype.str, [self.arrays.n_ids]]}
        pos = self.arrays.n_ids * self.arrays.ids_dtype.itemsize
        for name, arr in self.arrays.tables().items():
            pad = (-pos) % 8
            fh.write(b"\0" * pad)
            pos += pad
            arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
            fh.write(arr.tobytes())
            layout[name] = [pos, arr.dtype.str, list(arr.shape)]
            pos += arr.nbytes
        footer = json.dumps({"layout": LAYOUT_VERSION, "arrays": layout, "meta": self.meta}).encode()
        fh.write(footer + len(footer).to_bytes(8, "little") + MAGIC)
        fh.close()
        self.fh = None
        payload = self.path.with_name(f"{self.path.stem}.{os.getpid()}-{uuid.uuid4().hex[:8]}.bin")
        os.replace(self.tmp, payload)
        self.tmp = None
        manifest = {"magic": MAGIC.decode(), "payload": payload.name, "size": os.path.getsize(payload)}
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump(manifest, out)
            os.replace(tmp, self.path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            os.unlink(payload)
            raise
        # Payloads of earlier builds of this entry: unlinked (a process still mapping one keeps it until it exits).
        for old in self.path.parent.glob(f"{self.path.stem}.*.bin"):
            if old != payload:
                with contextlib.suppress(OSError):
                    old.unlink()

    def abort(self) -> None:
        try:
            if self.fh is not None:
                self.fh.close()
        except OSError:
            pass
        finally:
            self.fh = None
            if self.tmp and os.path.exists(self.tmp):
                os.unlink(self.tmp)
            self.tmp = None


class Examples(Sequence):
    """Training (or validation) examples drawn from token stores: example i is row rows[i] of store
    stores[store_of[i]], kept to its first ends[i] tokens. Indexing gives {"input_ids": [...], "labels": [...]}
    (the collators' input), built from the mapped arrays at each access; `lengths` is the numpy array of lengths.
    last_only: only each row's last loss span carries loss (data.loss_turns=last)."""

    def __init__(self, stores: Sequence[TokenStore], store_of: np.ndarray, rows: np.ndarray, ends: np.ndarray,
                 last_only: bool = False):
        self.stores = list(stores)
        self.store_of = np.asarray(store_of, dtype=np.int32)
        self.rows = np.asarray(rows, dtype=np.int64)
        self.ends = np.asarray(ends, dtype=np.int64)
        self.last_only = last_only

    @classmethod
    def empty(cls) -> "Examples":
        z = np.zeros(0, dtype=np.int64)
        return cls([], z, z, z)

    @classmethod
    def concat(cls, parts: Sequence["Examples"], order: Optional[np.ndarray] = None) -> "Examples":
        """Several example sets as one (each keeps its stores), optionally in `order`."""
        stores, store_of, rows, ends = [], [], [], []
        last_only = any(p.last_only for p in parts)
        for p in parts:
            if len(p) and p.last_only != last_only:
                raise ValueError("cannot mix loss_turns modes")
            store_of.append(p.store_of + len(stores))
            stores.extend(p.stores)
            rows.append(p.rows)
            ends.append(p.ends)
        out = cls(stores, np.concatenate(store_of) if store_of else np.zeros(0), np.concatenate(rows) if rows
                  else np.zeros(0), np.concatenate(ends) if ends else np.zeros(0), last_only)
        return out.take(order) if order is not None else out

    def take(self, positions: np.ndarray) -> "Examples":
        positions = np.asarray(positions, dtype=np.int64)
        return Examples(self.stores, self.store_of[positions], self.rows[positions], self.ends[positions],
                        self.last_only)

    @property
    def lengths(self) -> np.ndarray:
        return self.ends

    def __len__(self) -> int:
        return len(self.rows)

    def _example(self, i: int) -> dict:
        store = self.stores[int(self.store_of[i])]
        row, end = int(self.rows[i]), int(self.ends[i])
        ids = store.row_ids(row, end).tolist()
        spans = store.row_spans(row).tolist()
        if self.last_only:
            spans = spans[-1:]
        return {"input_ids": ids, "labels": labels_for(ids, spans, end)}

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._example(j) for j in range(*i.indices(len(self)))]
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"example {i} out of range ({len(self)} examples)")
        return self._example(i)

    def __iter__(self) -> Iterator[dict]:
        for i in range(len(self)):
            yield self._example(i)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, (str, bytes)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # mutable-content sequence, like list

    def __repr__(self) -> str:
        return f"Examples({len(self)} examples, {int(self.ends.sum()) if len(self) else 0} tokens)"
