"""Deterministic data order: which examples each process sees at each micro-step.

The order is a pure function of (seed, epoch, world, rank), so a resumed run can skip to any position
without replaying a stateful sampler, and every process agrees on how many micro-batches an epoch has.
"""

from __future__ import annotations

import torch

from medsft.train.optim import StepPlan


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
