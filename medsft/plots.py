"""PNG charts of a run's metrics.jsonl (medsft.outputs), so a run without wandb is still visible."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402


def plot_curves(records: list[dict], out_path: Path) -> Optional[Path]:
    """PNG of train/val loss and LR against optimizer step, so a run without wandb is still visible."""
    train = [r for r in records if r.get("kind") == "train"]
    if not train:
        return None
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


def plot_rl_curves(records: list[dict], out_path: Path) -> Optional[Path]:
    """PNG of the mean reward (total and per reward function), format failures and KL against the step."""
    train = [r for r in records if r.get("kind") == "train" and r.get("reward") is not None]
    if not train:
        return None
    steps = [r["step"] for r in train]
    fig, (ax_r, ax_k) = plt.subplots(1, 2, figsize=(11, 4))
    ax_r.plot(steps, [r["reward"] for r in train], label="reward (weighted sum)", linewidth=2)
    for key in sorted({k for r in train for k in r if k.startswith("rewards/") and k.endswith("/mean")}):
        ax_r.plot(steps, [r.get(key) for r in train], label=key[len("rewards/"):-len("/mean")], alpha=0.7)
    ax_r.plot(steps, [r.get("format/failure_rate") for r in train], label="format failures", linestyle="--")
    ax_r.set_xlabel("step")
    ax_r.legend(fontsize=8)
    ax_k.plot(steps, [r.get("kl") for r in train], label="KL (per token)")
    ax_k.plot(steps, [r.get("entropy") for r in train], label="entropy")
    ax_k.set_xlabel("step")
    ax_k.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path, dpi=90)
    plt.close(fig)
    return Path(out_path)
