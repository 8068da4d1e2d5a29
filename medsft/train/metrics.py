"""Training metrics: token-level sums per micro-batch, reduced across processes when a window is logged.

Everything is kept as sums (loss over tokens, correct tokens, token counts) and divided only when logged,
so the loss is the mean over loss-carrying tokens of the whole window on all processes, never a mean of
per-batch means.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

# padded_tokens: tokens computed on, padding included; flops: useful training FLOPs (medsft.compute.flops).
SUM_KEYS = ("loss_sum", "loss_tokens", "correct", "tokens", "samples", "padded_tokens", "flops")


@dataclass
class MetricWindow:
    """Sums since the last log line; reduced across processes only when read."""

    sums: dict = field(default_factory=lambda: {k: 0.0 for k in SUM_KEYS})
    steps: int = 0
    skipped: int = 0
    grad_norms: list = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)

    def add_micro_batch(self, loss_sum: float, loss_tokens: int, correct: int, tokens: int, samples: int,
                        padded_tokens: int | None = None, flops: float = 0.0) -> None:
        padded = tokens if padded_tokens is None else padded_tokens
        for key, value in zip(SUM_KEYS, (loss_sum, loss_tokens, correct, tokens, samples, padded, flops)):
            self.sums[key] += float(value)

    def reduce(self, accelerator, peak_flops: float | None = None) -> dict:
        """Sum the window over processes and turn it into the logged figures."""
        local = torch.tensor([self.sums[k] for k in SUM_KEYS], dtype=torch.float64, device=accelerator.device)
        total = accelerator.reduce(local, reduction="sum") if accelerator.num_processes > 1 else local
        loss_sum, loss_tokens, correct, tokens, samples, padded_tokens, flops = total.tolist()
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        world = accelerator.num_processes
        finite_norms = [g for g in self.grad_norms if g is not None and math.isfinite(g)]
        return {
            "loss": loss_sum / loss_tokens if loss_tokens else float("nan"),
            "token_acc": correct / loss_tokens if loss_tokens else float("nan"),
            "grad_norm": sum(finite_norms) / len(finite_norms) if finite_norms else None,
            "loss_tokens": int(loss_tokens),
            "tokens": int(tokens),
            "samples": int(samples),
            "tokens_per_s": tokens / elapsed,
            "loss_tokens_per_s": loss_tokens / elapsed,
            "tokens_per_s_per_device": tokens / elapsed / world,
            # real / (real + padding); below 1 only for padded batches (packing computes no padding)
            "padding_efficiency": min(1.0, tokens / padded_tokens) if padded_tokens else None,
            "mfu": flops / elapsed / world / peak_flops if (peak_flops and flops) else None,
            "skipped_in_window": self.skipped,
        }

    def saved_state(self, accelerator) -> dict:
        """The window not yet logged, summed over processes (collective when there are several), for a
        checkpoint: a resumed run then logs the same figures as an uninterrupted one."""
        local = torch.tensor([self.sums[k] for k in SUM_KEYS], dtype=torch.float64, device=accelerator.device)
        total = accelerator.reduce(local, reduction="sum") if accelerator.num_processes > 1 else local
        return {"sums": dict(zip(SUM_KEYS, total.tolist())), "steps": self.steps, "skipped": self.skipped,
                "grad_norms": list(self.grad_norms)}

    @classmethod
    def restored(cls, saved: dict | None, is_main: bool) -> "MetricWindow":
        """A window continuing a saved one: its sums on the main process (the others start at zero, the log
        line sums over processes), its step/skip counts and grad norms everywhere."""
        window = cls()
        if saved:
            if is_main:
                window.sums.update({k: float(v) for k, v in saved.get("sums", {}).items() if k in window.sums})
            window.steps = int(saved.get("steps", 0))
            window.skipped = int(saved.get("skipped", 0))
            window.grad_norms = list(saved.get("grad_norms", []))
        return window
