"""What a run cost: wall time, training throughput and peak memory, for the final summary (metrics.jsonl and the
console) and the progress bar.

    wall_time_s       from the start of the run (setup included: data, model, before-check) to its summary
    train_time_s      seconds inside optimizer steps (forward, backward, optimizer), this session only
    train_tokens      real tokens (padding excluded) those steps computed on, summed over processes
    tokens_per_s      train_tokens / train_time_s: the training throughput, checkpoints and evals excluded
    peak_memory_gb    CUDA: the most memory torch allocated on any process's GPU; CPU: the largest peak
                      resident set size (RSS) of any training process
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass, field

import torch

GIB = 1024**3


@dataclass
class RunStats:
    started: float = field(default_factory=time.perf_counter)
    train_seconds: float = 0.0
    tokens: float = 0.0  # this process's real tokens in this session's optimizer steps
    steps: int = 0

    def add_step(self, tokens: float, seconds: float) -> None:
        self.tokens += float(tokens)
        self.train_seconds += float(seconds)
        self.steps += 1

    def figures(self, accelerator) -> dict:
        """The summary's cost figures. Collective when there are several processes: every process calls it."""
        device = accelerator.device
        local = torch.tensor([self.tokens, peak_memory_bytes(device)], dtype=torch.float64, device=device)
        if accelerator.num_processes > 1:
            gathered = accelerator.gather(local.unsqueeze(0)).reshape(-1, 2)
            tokens, peak = float(gathered[:, 0].sum()), float(gathered[:, 1].max())
        else:
            tokens, peak = float(local[0]), float(local[1])
        return {
            "wall_time_s": round(time.perf_counter() - self.started, 3),
            "train_time_s": round(self.train_seconds, 3),
            "train_tokens": int(tokens),
            "tokens_per_s": round(tokens / self.train_seconds, 1) if self.train_seconds > 0 else None,
            "peak_memory_gb": round(peak / GIB, 3),
            "peak_memory_kind": "cuda_allocated" if device.type == "cuda" else "process_rss",
        }


def peak_memory_bytes(device: torch.device) -> float:
    """CUDA: torch's peak allocation on this device; otherwise this process's peak RSS (ru_maxrss)."""
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return float(rss if sys.platform == "darwin" else rss * 1024)  # bytes on macOS, KiB on Linux


def duration(seconds: float) -> str:
    """`45.2 s`, `7 min 17 s`, `2 h 03 min`."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def rate(tokens_per_s: float) -> str:
    """`812 tok/s`, `12.3k tok/s`, `1.25M tok/s`."""
    if tokens_per_s >= 1e6:
        return f"{tokens_per_s / 1e6:.2f}M tok/s"
    if tokens_per_s >= 1e4:
        return f"{tokens_per_s / 1e3:.1f}k tok/s"
    return f"{tokens_per_s:,.0f} tok/s"


def cost_lines(summary: dict) -> list[tuple[str, str]]:
    """(label, text) rows of the console summary for the cost figures of `RunStats.figures`."""
    rows = []
    if summary.get("wall_time_s") is not None:
        rows.append(("wall time", duration(summary["wall_time_s"])))
    if summary.get("tokens_per_s") is not None:
        rows.append(("throughput", f"{rate(summary['tokens_per_s'])} ({summary['train_tokens']:,} tokens in "
                                   f"{duration(summary['train_time_s'])} of optimizer steps)"))
    if summary.get("peak_memory_gb") is not None:
        kind = ("GPU, allocated by torch" if summary.get("peak_memory_kind") == "cuda_allocated"
                else "resident, the largest process")
        rows.append(("peak memory", f"{summary['peak_memory_gb']:.2f} GiB ({kind})"))
    return rows


COST_KEYS = ("wall_time_s", "train_time_s", "train_tokens", "tokens_per_s", "peak_memory_gb", "peak_memory_kind")
