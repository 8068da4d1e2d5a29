"""Padding-free packing: best-fit bin packing of examples into rows, and the collator that joins them.

Packing puts several examples into one row so no compute is spent on padding. Done naively it lets an example
attend to the ones packed before it and makes the last token of one example "predict" the first token of the
next (TRL #3067, LLaMA-Factory #8277). Here neither can happen:

* `PackedCollator` flattens a micro-batch into ONE padding-free row `[1, T]` and describes where each example
  starts with three equivalent boundary representations: `position_ids` restarting at 0 for every example,
  `cu_seq_lens` (cumulative lengths, int32, the flash-attention varlen format) and `seq_idx` (example number of
  every token). There is no all-ones `attention_mask` in the batch: one would make transformers treat the row
  as a single sequence.
* The label of every example's FIRST token is -100. Losses are taken on `labels[:, 1:]` from logits[:, :-1],
  so that is exactly the target the previous example's last token would predict; an example's own first
  token is never a target anyway (nothing precedes it inside the example).
* Attention is block-diagonal by construction (`medsft.compute.attention`): per-example causal sdpa on CPU,
  flash-attention varlen or a flex document mask on GPU. Tests check that per-example losses and gradients
  equal those of the examples run alone.

The packer is best-fit decreasing (examples longest first, each into the fullest row that still has room),
deterministic given the seed (which only orders examples of equal length). It runs once per run; the data order
(`medsft.data.order.packed_micro_batches`) shuffles the rows per epoch, so the order stays a pure function of
(seed, epoch, world, rank) and a resume lands on the same rows.
"""

from __future__ import annotations

import bisect
import random
from typing import Any, Optional, Sequence

import torch

from medsft.data.render import IGNORE_INDEX


def best_fit_decreasing(lengths: Sequence[int], capacity: int, seed: int = 0) -> list[list[int]]:
    """Indices of `lengths` grouped into rows whose total length is <= capacity.

    Longest first; each example goes into the row with the LEAST room left that still fits it (best fit), or a
    new row. Ties between equal lengths are ordered by a permutation drawn from `seed`; rows sharing the same
    room are taken last-opened first. O(n log n + n log capacity); 100k examples take well under a second.
    """
    capacity = int(capacity)
    if capacity < 1:
        raise ValueError(f"capacity={capacity} must be >= 1")
    n = len(lengths)
    tiebreak = list(range(n))
    random.Random(seed).shuffle(tiebreak)
    order = sorted(range(n), key=lambda i: (-int(lengths[i]), tiebreak[i]))
    rows: list[list[int]] = []
    free_values: list[int] = []  # sorted distinct amounts of room that some open row has
    by_free: dict[int, list[int]] = {}  # room -> rows (indices into `rows`) with exactly that room
    for i in order:
        length = int(lengths[i])
        if length > capacity:
            raise ValueError(f"example {i} has {length} tokens, more than the row capacity {capacity}")
        if length < 1:
            raise ValueError(f"example {i} is empty")
        pos = bisect.bisect_left(free_values, length)
        if pos < len(free_values):
            room = free_values[pos]
            bucket = by_free[room]
            row = bucket.pop()
            if not bucket:
                del by_free[room]
                free_values.pop(pos)
        else:
            room, row = capacity, len(rows)
            rows.append([])
        rows[row].append(i)
        left = room - length
        if left > 0:
            if left not in by_free:
                by_free[left] = []
                bisect.insort(free_values, left)
            by_free[left].append(row)
    return rows


def packing_stats(lengths: Sequence[int], rows: Sequence[Sequence[int]], capacity: int) -> dict:
    """How full the rows are: real tokens over rows x capacity (what a fixed-width layout would compute)."""
    tokens = sum(int(lengths[i]) for row in rows for i in row)
    return {
        "rows": len(rows),
        "examples": sum(len(row) for row in rows),
        "tokens": tokens,
        "fill": tokens / (len(rows) * capacity) if rows else 0.0,
        "mean_examples_per_row": sum(len(row) for row in rows) / len(rows) if rows else 0.0,
    }


class PackedCollator:
    """Examples -> one padding-free row with sequence boundaries (see the module docstring).

    Returns input_ids, labels, position_ids and seq_idx of shape [1, T] (T = the examples' total length),
    cu_seq_lens ([n + 1], int32), max_length (the longest example), num_examples and real_tokens (ints).
    `pad_to_multiple_of` appends one weightless filler segment (pad ids, labels -100, its own positions and
    sequence index) so T is a multiple of it, for kernels that want aligned shapes; off by default.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: Optional[int] = None):
        if pad_token_id is None:
            raise ValueError("PackedCollator needs a pad_token_id (only used by pad_to_multiple_of filler)")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of={pad_to_multiple_of} must be >= 1")
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if not examples:
            raise ValueError("PackedCollator got an empty batch")
        ids: list[int] = []
        labels: list[int] = []
        lengths: list[int] = []
        for i, ex in enumerate(examples):
            a, b = _as_list(ex["input_ids"]), _as_list(ex["labels"])
            if len(a) != len(b):
                raise ValueError(f"example {i} of the batch: {len(a)} input_ids but {len(b)} labels")
            if not a:
                raise ValueError(f"example {i} of the batch is empty")
            ids.extend(a)
            labels.extend(b)
            lengths.append(len(a))
        num_examples = len(lengths)
        m = self.pad_to_multiple_of
        if m and len(ids) % m:
            filler = m - len(ids) % m
            ids.extend([self.pad_token_id] * filler)
            labels.extend([IGNORE_INDEX] * filler)
            lengths.append(filler)
        length_t = torch.tensor(lengths, dtype=torch.long)
        cu_seq_lens = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        cu_seq_lens[1:] = torch.cumsum(length_t, 0).to(torch.int32)
        starts = cu_seq_lens[:-1].long()
        total = int(cu_seq_lens[-1])
        # position within its example: global index minus the start of the example it belongs to
        seq_idx = torch.repeat_interleave(torch.arange(len(lengths), dtype=torch.int32), length_t)
        position_ids = torch.arange(total, dtype=torch.long) - starts[seq_idx.long()]
        out_labels = torch.tensor(labels, dtype=torch.long)
        out_labels[starts] = IGNORE_INDEX  # never a target across a boundary
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long)[None],
            "labels": out_labels[None],
            "position_ids": position_ids[None],
            "seq_idx": seq_idx[None],
            "cu_seq_lens": cu_seq_lens,
            "max_length": int(length_t.max()),
            "num_examples": num_examples,
            "real_tokens": int(sum(lengths[:num_examples])),
        }


def is_packed(batch: dict) -> bool:
    return "cu_seq_lens" in batch


def _as_list(x: Any) -> list:
    if isinstance(x, torch.Tensor):
        return x.tolist()
    return list(x)
