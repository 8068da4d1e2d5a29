"""The tokenization pass: the selected records of one source, in chunks, rendered and tokenized in parallel
worker processes (`data.num_proc`), written to a token store file as the chunks come back (in order).

Each worker reads its chunk's records from the source itself (by byte span, or by row), so neither the records
nor their token ids ever pile up in one process: the main process holds only the current chunk's ids on their
way to disk. Workers are forked on Linux (no re-import, the tokenizer is inherited) with the Rust tokenizer's
own threads off (one process per core instead); elsewhere they are spawned.

The character bound: a token covers at most `L` characters of text (the longest entry of the vocabulary, when
the tokenizer's normalizer and pre-tokenizer never drop characters), so a record of more than max_seq_len x L
characters is certainly over the length limit before it is tokenized. Such records are not tokenized whole
(`char_bound`): dropped under data.overlong=drop (or an error under error), and under truncate only a prefix
long enough for max_seq_len tokens is tokenized (`truncated_prefix`).
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import multiprocessing
import os
import sys
from collections import deque
from dataclasses import dataclass, replace
from typing import Any, Iterator, Optional, Sequence

import numpy as np
from tqdm.auto import tqdm

from medsft.data.base import Record, Turn
from medsft.data.formats import Adapter
from medsft.data.records import fetch
from medsft.data.render import Rendered, render_records
from medsft.data.sources import Source

log = logging.getLogger(__name__)

CHUNK_RECORDS = 512  # records per task (a worker's unit of work, and the progress bar's)
MIN_PARALLEL_RECORDS = 4 * CHUNK_RECORDS  # below this, workers cost more than they save
MAX_WORKERS = 8
# Normalizers / pre-tokenizers that never remove characters (a token then covers at most its own length).
_SAFE_NORMALIZERS = {"NFC": 4, "NFKC": 4, "NFD": 1, "NFKD": 1, "Lowercase": 1, "Prepend": 1}
_SAFE_PRE_TOKENIZERS = {"ByteLevel", "Metaspace", "Digits", "Punctuation", "UnicodeScripts", "Split"}


@dataclass
class RenderJob:
    """What a worker needs to turn records of one source into token ids."""

    tokenizer: Any
    source: Source
    adapter: Adapter
    response_template: str
    system_prompt: Optional[str]


_JOB: Optional[RenderJob] = None  # the worker's job (set by the pool's initializer, or in-process)


def pack(rendered: Sequence[Rendered], indices: np.ndarray) -> tuple:
    """Rendered conversations as flat arrays: (ids, lengths, spans, n_spans, index)."""
    lengths = np.fromiter((len(r.ids) for r in rendered), dtype=np.int64, count=len(rendered))
    ids = (np.concatenate([np.asarray(r.ids, dtype=np.int32) for r in rendered]) if rendered
           else np.zeros(0, dtype=np.int32))
    span_lists = [r.loss_spans() for r in rendered]
    n_spans = np.fromiter((len(s) for s in span_lists), dtype=np.int64, count=len(rendered))
    spans = np.array([x for s in span_lists for x in s], dtype=np.int32).reshape(-1, 2)
    return ids, lengths, spans, n_spans, np.asarray(indices, dtype=np.int64)


@contextlib.contextmanager
def gc_paused():
    """Millions of small int lists trigger repeated full GC passes (~10% of tokenization); they hold no cycles."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _render_chunk(task: tuple) -> tuple:
    indices, starts, ends, lines = task
    job = _JOB
    with gc_paused():
        records = fetch(job.source, job.adapter, indices, starts, ends, lines)
        rendered = render_records(job.tokenizer, records, job.response_template, job.system_prompt)
        return pack(rendered, indices)


def _init_worker(job: Optional[RenderJob]) -> None:
    global _JOB
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
    if job is not None:
        _JOB = job


def workers_for(num_proc: int, n_records: int) -> int:
    """How many worker processes: data.num_proc (0 = one per CPU core, at most 8); 1 below a few chunks."""
    if num_proc == 1 or n_records < MIN_PARALLEL_RECORDS:
        return 1
    chunks = -(-n_records // CHUNK_RECORDS)
    if num_proc <= 0:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            cores = os.cpu_count() or 1
        num_proc = min(cores, MAX_WORKERS)
    return max(1, min(num_proc, chunks))


@contextlib.contextmanager
def _parallelism_off_while_forking():
    """Children forked now inherit TOKENIZERS_PARALLELISM=false (so the tokenizers library neither warns nor
    deadlocks); this process keeps its setting."""
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


def render_chunks(job: RenderJob, tasks: list[tuple], workers: int, desc: str,
                  progress: Optional[bool]) -> Iterator[tuple]:
    """Each task's packed arrays, in task order, computed by `workers` processes (or this one)."""
    global _JOB
    disable = None if progress is None else not progress
    total = sum(len(t[0]) for t in tasks)
    with tqdm(total=total, desc=desc, unit="rec", disable=disable, leave=False) as bar:
        if workers <= 1:
            _JOB = job
            try:
                for task in tasks:
                    out = _render_chunk(task)
                    bar.update(len(task[0]))
                    yield out
            finally:
                _JOB = None
            return
        fork = sys.platform.startswith("linux")
        ctx = multiprocessing.get_context("fork" if fork else "spawn")
        if fork:
            _JOB = job  # inherited by the forked workers
        try:
            with _parallelism_off_while_forking():
                pool = ctx.Pool(workers, initializer=_init_worker, initargs=(None if fork else job,))
            try:
                for task, out in zip(tasks, pool.imap(_render_chunk, tasks)):
                    bar.update(len(task[0]))
                    yield out
            finally:
                pool.terminate()
                pool.join()
        finally:
            _JOB = None


class Pipeline:
    """Workers tokenizing while the records are still being validated: the validation pass (`scan`) hands each
    valid record to `feed`, chunks go to the workers as they fill, and their arrays are written to `writer` in
    order as they come back. `finish` waits for the rest; `abort` drops everything (the scan found an error, or
    the cache already had the entry). Records over the character bound are not fed on (see `char_bound`)."""

    def __init__(self, tokenizer: Any, source: Source, response_template: str, system_prompt: Optional[str],
                 workers: int, writer: Any, bound: Optional[int], desc: str, progress: Optional[bool]):
        self.tokenizer, self.source = tokenizer, source
        self.template, self.system_prompt = response_template, system_prompt
        self.workers, self.writer, self.bound = workers, writer, bound
        self.pending: list[tuple] = []
        self.results: deque = deque()
        self.pool = None
        self.fed = 0
        disable = None if progress is None else not progress
        self.bar = tqdm(desc=desc, unit="rec", disable=disable, leave=False)

    def feed(self, adapter: Adapter, index: int, start: int, end: int, line: Optional[int], chars: int) -> None:
        if self.bound is not None and chars > self.bound:
            return
        self.pending.append((index, start, end, -1 if line is None else line))
        self.fed += 1
        if len(self.pending) >= CHUNK_RECORDS:
            self._submit(adapter)

    def _submit(self, adapter: Adapter) -> None:
        global _JOB
        if not self.pending:
            return
        if self.pool is None:
            fork = sys.platform.startswith("linux")
            job = RenderJob(self.tokenizer, self.source, adapter, self.template, self.system_prompt)
            ctx = multiprocessing.get_context("fork" if fork else "spawn")
            if fork:
                _JOB = job  # inherited by the forked workers
            try:
                with _parallelism_off_while_forking():
                    self.pool = ctx.Pool(self.workers, initializer=_init_worker, initargs=(None if fork else job,))
            finally:
                _JOB = None
            self.adapter = adapter
        cols = list(zip(*self.pending))
        task = tuple(np.asarray(c, dtype=np.int64) for c in cols)
        self.pending = []
        self.results.append((len(task[0]), self.pool.apply_async(_render_chunk, (task,))))
        self._drain(block=len(self.results) > 4 * self.workers)

    def _drain(self, block: bool = False) -> None:
        while self.results and (block or self.results[0][1].ready()):
            n, res = self.results.popleft()
            self.writer.add(*res.get())
            self.bar.update(n)
            block = block and len(self.results) > 4 * self.workers

    def finish(self, adapter: Adapter) -> None:
        """Tokenize what is still pending and write every chunk (in order)."""
        try:
            self._submit(adapter)
            while self.results:
                self._drain(block=True)
        finally:
            self.close()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None
        self.results.clear()
        self.bar.close()

    abort = close


# ------------------------------------------------------------------------------------------ the character bound


def chars_per_token(tokenizer: Any) -> Optional[int]:
    """The most characters of input text one token can cover, or None when that cannot be bounded (a slow
    tokenizer, or one whose normalizer or pre-tokenizer may drop characters)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    try:
        spec = json.loads(backend.to_str())
    except Exception:  # a backend that cannot describe itself: no bound
        return None
    factor = 1

    def kinds(node: Optional[dict], key: str) -> list[dict]:
        if not node:
            return []
        if node.get("type") == "Sequence":
            return [k for sub in node.get(key, []) for k in kinds(sub, key)]
        return [node]

    for n in kinds(spec.get("normalizer"), "normalizers"):
        t = n.get("type")
        if t == "Replace":
            pattern = (n.get("pattern") or {}).get("String")
            if pattern is None or len(n.get("content", "")) < len(pattern):
                return None
        elif t in _SAFE_NORMALIZERS:
            factor = max(factor, _SAFE_NORMALIZERS[t])
        else:
            return None
    for p in kinds(spec.get("pre_tokenizer"), "pretokenizers"):
        t = p.get("type")
        if t not in _SAFE_PRE_TOKENIZERS or (t == "Split" and p.get("behavior") == "Removed"):
            return None
    longest = max((len(k) for k in tokenizer.get_vocab()), default=1)
    return max(1, longest) * factor


def char_bound(tokenizer: Any, max_seq_len: int) -> Optional[int]:
    """Records with more characters than this are certainly over max_seq_len tokens (None: no bound)."""
    per = chars_per_token(tokenizer)
    return None if per is None else per * int(max_seq_len)


def truncated_prefix(rec: Record, budget: int) -> Record:
    """The record with its text cut after `budget` characters (in rendering order): its first tokens are the
    whole record's, far enough before the cut (`budget` covers max_seq_len tokens and a margin)."""
    left = budget

    def cut(text: str) -> str:
        nonlocal left
        piece = text[:max(0, left)]
        left -= len(piece)
        return piece or text[:1]

    if rec.turns is None:
        return replace(rec, question=cut(rec.question), reasoning=cut(rec.reasoning), response=cut(rec.response))
    system = cut(rec.system) if rec.system else rec.system
    turns = []
    for t in rec.turns:
        reasoning = cut(t.reasoning) if t.reasoning else t.reasoning
        turns.append(Turn(t.role, cut(t.content), reasoning))
    return replace(rec, system=system, turns=tuple(turns))
