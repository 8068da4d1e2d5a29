"""What the training loop iterates: which examples each process sees at each micro-step, grouped into
optimizer steps, and the collator that turns them into a batch (padded, grouped by length, or packed rows).

The order is a pure function of (seed, epoch, world, rank), so a resumed run can skip to any position
without replaying a stateful sampler, and every process agrees on how many micro-batches an epoch has.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from medsft.data.collate import SFTCollator
from medsft.data.packing import PackedCollator, best_fit_decreasing, packing_stats
from medsft.data.store import Examples

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepPlan:
    """How the data maps onto micro-batches and optimizer steps, identical on every process.

    Each epoch's permutation is padded to a multiple of `world` (like DistributedSampler), cut into global
    micro-batches of `bsz * world` examples (the last one may be smaller but still divisible by `world`),
    and every `accum` consecutive micro-batches form one optimizer step (the epoch's last group may be
    shorter: it still steps, so no example is dropped).
    """

    num_examples: int
    bsz: int
    accum: int
    world: int
    epochs: int
    max_steps: int = 0

    @property
    def padded_examples(self) -> int:
        return math.ceil(self.num_examples / self.world) * self.world

    @property
    def micro_batches_per_epoch(self) -> int:
        return math.ceil(self.padded_examples / (self.bsz * self.world))

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.micro_batches_per_epoch / self.accum)

    @property
    def total_steps(self) -> int:
        full = self.steps_per_epoch * self.epochs
        return min(full, self.max_steps) if self.max_steps > 0 else full

    @property
    def global_batch(self) -> int:
        return self.bsz * self.accum * self.world

    def warmup_steps(self, warmup_rates: float) -> int:
        return int(math.ceil(warmup_rates * self.total_steps))


def epoch_permutation(num_examples: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    if not shuffle:
        return list(range(num_examples))
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(num_examples, generator=generator).tolist()


def rank_micro_batches(plan: StepPlan, seed: int, epoch: int, rank: int, shuffle: bool = True) -> list[list[int]]:
    """Example indices of this process's micro-batches for one epoch (same count on every rank)."""
    order = epoch_permutation(plan.num_examples, seed, epoch, shuffle)
    # Pad with the epoch's first examples so the count divides by world (DistributedSampler does the same).
    order += order[: plan.padded_examples - len(order)]
    global_bsz = plan.bsz * plan.world
    batches = []
    for start in range(0, len(order), global_bsz):
        chunk = order[start : start + global_bsz]
        per_rank = len(chunk) // plan.world
        batches.append(chunk[rank * per_rank : (rank + 1) * per_rank])
    return batches


def optimizer_step_groups(batches: list[list[int]], accum: int) -> list[list[list[int]]]:
    """Micro-batches grouped per optimizer step; the epoch's last group may hold fewer than `accum`."""
    return [batches[i : i + accum] for i in range(0, len(batches), accum)]


# ------------------------------------------------------------------------------ length grouping and packing
# Both keep the contract above: the order is a pure function of (seed, epoch, world, rank) and of the data
# (lengths, or the rows packed once per run), with the same number of micro-batches per epoch as the plan says.


def length_grouped_micro_batches(
    plan: StepPlan,
    lengths: list[int],
    seed: int,
    epoch: int,
    rank: int,
    shuffle: bool = True,
    bucket_batches: int = 64,
) -> list[list[int]]:
    """Like `rank_micro_batches`, with examples of similar length in the same micro-batch.

    The epoch's permutation is cut into buckets of `bucket_batches` global micro-batches, each bucket is sorted
    by length (longest first), cut into global micro-batches, and the micro-batches of the whole epoch are then
    shuffled (seeded by seed and epoch), except the one holding the epoch's longest example, which goes first
    so that an out-of-memory shows at the first step. Every process of one global micro-batch gets examples of
    similar length too. Larger buckets remove more padding; the shuffle keeps batches of different lengths
    interleaved through the epoch.
    """
    if len(lengths) != plan.num_examples:
        raise ValueError(f"{len(lengths)} lengths for a plan of {plan.num_examples} examples")
    order = epoch_permutation(plan.num_examples, seed, epoch, shuffle)
    order += order[: plan.padded_examples - len(order)]
    global_bsz = plan.bsz * plan.world
    bucket = global_bsz * max(1, int(bucket_batches))
    chunks: list[list[int]] = []
    for start in range(0, len(order), bucket):
        part = sorted(order[start : start + bucket], key=lambda i: -lengths[i])  # stable: ties keep the shuffle
        chunks.extend(part[s : s + global_bsz] for s in range(0, len(part), global_bsz))
    # Only the epoch's last chunk can be short; which ones the shuffle moves where is seeded.
    if shuffle and len(chunks) > 1:
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch + 7_919)
        chunks = [chunks[i] for i in torch.randperm(len(chunks), generator=generator).tolist()]
        longest = max(range(len(chunks)), key=lambda c: (max(lengths[i] for i in chunks[c]), -c))
        chunks.insert(0, chunks.pop(longest))
    batches = []
    for chunk in chunks:
        per_rank = len(chunk) // plan.world
        batches.append(chunk[rank * per_rank : (rank + 1) * per_rank])
    return batches


def packed_micro_batches(
    plan: StepPlan, rows: list[list[int]], seed: int, epoch: int, rank: int, shuffle: bool = True
) -> list[list[int]]:
    """Micro-batches of `plan.bsz` packed rows (from `medsft.data.packing.best_fit_decreasing`), as example
    indices. The plan counts ROWS (num_examples == len(rows)); rows are shuffled per epoch exactly like
    examples in `rank_micro_batches`."""
    if len(rows) != plan.num_examples:
        raise ValueError(f"{len(rows)} packed rows for a plan of {plan.num_examples}")
    return [[i for r in batch for i in rows[r]] for batch in rank_micro_batches(plan, seed, epoch, rank, shuffle)]


class DataOrder:
    """Which examples each process sees per micro-batch for the configured mode: padded (the default), grouped
    by length (`data.group_by_length`) or packed (`data.packing`), and the collator of that mode. `units` is what
    the StepPlan counts: examples, or packed rows."""

    def __init__(self, mode: str, lengths: Sequence[int], collator: Any, rows: Optional[list[list[int]]] = None,
                 seed: int = 0, shuffle: bool = True):
        if mode not in ("padded", "grouped", "packed"):
            raise ValueError(f"unknown data order mode {mode!r}")
        if mode == "packed" and rows is None:
            raise ValueError("packed mode needs the packed rows")
        self.mode = mode
        self.lengths = list(lengths)
        self.rows = rows
        self.collator = collator
        self.seed = seed
        self.shuffle = shuffle

    @classmethod
    def from_config(cls, data_cfg, examples: Sequence[dict], seed: int, pad_token_id: int) -> "DataOrder":
        # medsft.data.store.Examples knows its lengths without building any example; a plain list is measured.
        lengths = examples.lengths.tolist() if isinstance(examples, Examples) else [len(ex["input_ids"])
                                                                                      for ex in examples]
        common = {"seed": seed, "shuffle": bool(data_cfg.shuffle)}
        if data_cfg.packing:
            rows = best_fit_decreasing(lengths, int(data_cfg.max_seq_len), seed)
            log.info("packing: %s", packing_stats(lengths, rows, int(data_cfg.max_seq_len)))
            return cls("packed", lengths, PackedCollator(pad_token_id=pad_token_id), rows, **common)
        mode = "grouped" if data_cfg.group_by_length else "padded"
        return cls(mode, lengths, SFTCollator(pad_token_id=pad_token_id), **common)

    @property
    def units(self) -> int:
        return len(self.rows) if self.mode == "packed" else len(self.lengths)

    def plan(self, bsz: int, accum: int, world: int, epochs: int, max_steps: int = 0) -> StepPlan:
        return StepPlan(num_examples=self.units, bsz=bsz, accum=accum, world=world, epochs=epochs,
                        max_steps=max_steps)

    def micro_batches(self, plan: StepPlan, epoch: int, rank: int) -> list[list[int]]:
        if self.mode == "packed":
            return packed_micro_batches(plan, self.rows, self.seed, epoch, rank, self.shuffle)
        if self.mode == "grouped":
            return length_grouped_micro_batches(plan, self.lengths, self.seed, epoch, rank, self.shuffle)
        return rank_micro_batches(plan, self.seed, epoch, rank, self.shuffle)

    def step_groups(self, plan: StepPlan, epoch: int, rank: int) -> list[list[list[int]]]:
        """This process's micro-batches of one epoch, grouped per optimizer step."""
        return optimizer_step_groups(self.micro_batches(plan, epoch, rank), plan.accum)

    def collate(self, examples: Sequence[dict]) -> dict:
        return self.collator(examples)
