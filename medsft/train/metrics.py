"""Training metrics: token-level sums per micro-batch, reduced across processes, written as JSON lines.

Everything is kept as sums (loss over tokens, correct tokens, token counts) and divided only when logged,
so the loss is the mean over loss-carrying tokens of the whole window on all processes, never a mean of
per-batch means.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

# padded_tokens: tokens computed on, padding included; flops: useful training FLOPs (medsft.train.flops).
_SUM_KEYS = ("loss_sum", "loss_tokens", "correct", "tokens", "samples", "padded_tokens", "flops")


def token_loss_sums(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sum of token cross-entropies, number of loss tokens, number of correct argmax predictions).

    Labels are the input ids with -100 where no loss is taken; the shift to next-token prediction happens here.
    Computed in fp32 whatever the model's dtype.
    """
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    mask = shift_labels != -100
    loss_sum = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )
    with torch.no_grad():
        correct = ((shift_logits.argmax(-1) == shift_labels) & mask).sum()
    return loss_sum, mask.sum(), correct


@dataclass
class MetricWindow:
    """Sums since the last log line; reduced across processes only when read."""

    sums: dict = field(default_factory=lambda: {k: 0.0 for k in _SUM_KEYS})
    steps: int = 0
    skipped: int = 0
    grad_norms: list = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)

    def add_micro_batch(self, loss_sum: float, loss_tokens: int, correct: int, tokens: int, samples: int,
                        padded_tokens: int | None = None, flops: float = 0.0) -> None:
        padded = tokens if padded_tokens is None else padded_tokens
        for key, value in zip(_SUM_KEYS, (loss_sum, loss_tokens, correct, tokens, samples, padded, flops)):
            self.sums[key] += float(value)

    def reduce(self, accelerator, peak_flops: float | None = None) -> dict:
        """Sum the window over processes and turn it into the logged figures."""
        local = torch.tensor([self.sums[k] for k in _SUM_KEYS], dtype=torch.float64, device=accelerator.device)
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


class MetricsFile:
    """Append-only `metrics.jsonl` on the main process; one JSON object per line, flushed each write."""

    def __init__(self, path: Path, enabled: bool):
        self.path = Path(path)
        self.enabled = enabled
        self.records: list[dict] = []
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        self.records.append(record)
        if self.enabled:
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def read_metrics(path: Path) -> list[dict]:
    with Path(path).open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def plot_curves(records: list[dict], out_path: Path) -> Path | None:
    """PNG of train/val loss and LR against optimizer step, so a run without wandb is still visible."""
    train = [r for r in records if r.get("kind") == "train"]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    val = [r for r in records if r.get("kind") == "val"]
    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if val:
        ax_loss.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val loss")
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel("loss (per token)")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_lr.plot([r["step"] for r in train], [r["lr"] for r in train], color="tab:orange")
    ax_lr.set_xlabel("optimizer step")
    ax_lr.set_ylabel("learning rate")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
