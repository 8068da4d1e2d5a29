"""Every PNG chart medsft writes, in one style: a run's curves.png (SFT) and rl_curves.png (RL), and a sweep's
loss_curves.png and objective_vs_<param>.png (medsft.sweep.report), so a run without wandb is still visible.

The style, the same everywhere: a title saying what is shown, optimizer steps on an integer axis (every step
ticked when there are few), markers on every measured point (validation points always, training points when
there are few enough to see), a light grid, the legend outside the curves, 110 dpi. Drawing goes through
matplotlib's object API (`Figure`, no pyplot state), so it is safe in any thread and never opens a window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, NullFormatter

DPI = 110
GRID_ALPHA = 0.3
TRAIN_MARKERS_UP_TO = 60  # training points drawn with markers when a curve has at most this many
_FEW_STEPS = 12  # a step axis spanning at most this many steps ticks every one


@dataclass
class LossCurve:
    """One run's losses against the optimizer step (for a chart holding several runs)."""

    label: str
    train_steps: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    val_steps: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    complete: bool = True  # False: drawn dotted (a failed or unfinished run)


@dataclass
class ObjectivePoint:
    x: float
    objective: float
    series: Optional[str] = None  # points of one series (the other swept values) are joined by a line


# ------------------------------------------------------------------------------------------------ the style


def _figure(width: float, height: float, ncols: int = 1) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=(width, height))
    return fig, [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]


def _step_axis(ax: Axes, steps: Sequence[float]) -> None:
    """Integer optimizer steps; every step ticked when the run is short."""
    ax.set_xlabel("optimizer step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    finite = [s for s in steps if s is not None and math.isfinite(s)]
    if finite and max(finite) - min(finite) <= _FEW_STEPS:
        low, high = int(math.floor(min(finite))), int(math.ceil(max(finite)))
        ax.set_xticks(range(low, high + 1))
        ax.set_xlim(low - 0.5, high + 0.5)


def _finish(ax: Axes, title: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=11)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=GRID_ALPHA)


def _legend_below(ax: Axes, entries: int) -> None:
    if entries:
        ax.legend(fontsize=8 if entries <= 10 else 7, loc="upper center", bbox_to_anchor=(0.5, -0.14),
                  ncol=1 if entries <= 6 else (2 if entries <= 30 else 3), frameon=False)


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def _train_marker(n_points: int) -> Optional[str]:
    return "o" if n_points <= TRAIN_MARKERS_UP_TO else None


# ------------------------------------------------------------------------------------------------ one run


def plot_curves(records: list[dict], out_path: Path, title: Optional[str] = None) -> Optional[Path]:
    """curves.png of an SFT run's metrics.jsonl records (None when no step was logged): `curves_figure`."""
    fig = curves_figure(records, title)
    return _save(fig, out_path) if fig is not None else None


def curves_figure(records: list[dict], title: Optional[str] = None) -> Optional[Figure]:
    """Train and validation loss (the validation loss before training included, at the step it was measured)
    and the learning rate, against the optimizer step."""
    train = [r for r in records if r.get("kind") == "train"]
    if not train:
        return None
    val = [r for r in records if r.get("kind") == "val"]
    fig, (ax_loss, ax_lr) = _figure(12, 4.2, ncols=2)
    steps = [r["step"] for r in train]
    ax_loss.plot(steps, [r["loss"] for r in train], "-", marker=_train_marker(len(train)), markersize=3.5,
                 label="train loss")
    if val:
        ax_loss.plot([r["step"] for r in val], [r["val_loss"] for r in val], "--o", markersize=5, label="validation loss")
        first = val[0]
        ax_loss.annotate(f"{first['val_loss']:.3f}", (first["step"], first["val_loss"]), textcoords="offset points",
                         xytext=(6, 4), fontsize=8)
        last = val[-1]
        if len(val) > 1:
            ax_loss.annotate(f"{last['val_loss']:.3f}", (last["step"], last["val_loss"]),
                             textcoords="offset points", xytext=(6, 4), fontsize=8)
    _step_axis(ax_loss, steps + [r["step"] for r in val])
    _finish(ax_loss, "Loss per token" + (f": {title}" if title else ""), "loss (per loss-carrying token)")
    ax_loss.legend(fontsize=8)
    ax_lr.plot(steps, [r["lr"] for r in train], "-", marker=_train_marker(len(train)), markersize=3.5,
               color="tab:orange")
    _step_axis(ax_lr, steps)
    _finish(ax_lr, "Learning rate (as applied at each step)", "learning rate")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    return fig


def plot_rl_curves(records: list[dict], out_path: Path, title: Optional[str] = None) -> Optional[Path]:
    """rl_curves.png: the mean reward (total and per reward function), format failures, KL and entropy."""
    train = [r for r in records if r.get("kind") == "train" and r.get("reward") is not None]
    if not train:
        return None
    steps = [r["step"] for r in train]
    marker = _train_marker(len(train))
    fig, (ax_r, ax_k) = _figure(12, 4.2, ncols=2)
    ax_r.plot(steps, [r["reward"] for r in train], "-", marker=marker, markersize=3.5, linewidth=2,
              label="reward (weighted sum)")
    for key in sorted({k for r in train for k in r if k.startswith("rewards/") and k.endswith("/mean")}):
        ax_r.plot(steps, [r.get(key) for r in train], "-", marker=marker, markersize=3, alpha=0.7,
                  label=key[len("rewards/"):-len("/mean")])
    ax_r.plot(steps, [r.get("format/failure_rate") for r in train], "--", marker=marker, markersize=3,
              label="format failures")
    _step_axis(ax_r, steps)
    _finish(ax_r, "Rewards" + (f": {title}" if title else ""), "mean per completion")
    ax_r.legend(fontsize=8)
    ax_k.plot(steps, [r.get("kl") for r in train], "-", marker=marker, markersize=3.5, label="KL (per token)")
    ax_k.plot(steps, [r.get("entropy") for r in train], "-", marker=marker, markersize=3.5, label="entropy")
    _step_axis(ax_k, steps)
    _finish(ax_k, "KL to the reference and entropy", "nats per token")
    ax_k.legend(fontsize=8)
    return _save(fig, out_path)


# ------------------------------------------------------------------------------------------------ many runs


def plot_loss_curves(curves: list[LossCurve], out_path: Path, title: str) -> Path:
    """Several runs' train loss (solid, dotted when not complete) and validation loss (dashed, markers) on one
    chart, one colour per run, the legend below it."""
    many = len(curves) > 10
    fig, (ax,) = _figure(11 if many else 8, 4.5)
    cmap = colormaps["tab10" if not many else "viridis"]
    for i, curve in enumerate(curves):
        color = cmap(i % 10) if not many else cmap(i / max(len(curves) - 1, 1))
        label: Optional[str] = curve.label
        style = "-" if curve.complete else ":"
        if curve.train_steps:
            ax.plot(curve.train_steps, curve.train_loss, style, color=color, label=label,
                    marker=_train_marker(len(curve.train_steps)), markersize=3)
            label = None
        if curve.val_steps:
            ax.plot(curve.val_steps, curve.val_loss, "--o", color=color, markersize=5, markerfacecolor="none",
                    label=label)
    _step_axis(ax, [s for c in curves for s in (*c.train_steps, *c.val_steps)])
    _finish(ax, title, "loss per token (solid: train, dashed/o: validation)")
    if not curves:
        ax.text(0.5, 0.5, "no metrics yet", ha="center", va="center", transform=ax.transAxes)
    _legend_below(ax, len(curves))
    return _save(fig, out_path)


def plot_objective(points: list[ObjectivePoint], out_path: Path, *, param: str, direction: str, title: str,
                   categories: Optional[list[str]] = None, log_x: bool = False,
                   best: Optional[ObjectivePoint] = None) -> Path:
    """The objective against one parameter: a line per series when a series has several points, else a
    scatter; the best point starred. `categories`: tick labels of a non-numeric parameter (x = their index)."""
    fig, (ax,) = _figure(7, 4.5)
    if log_x:
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # labelled minor ticks overlap
    if categories is not None:
        ax.set_xticks(range(len(categories)))
        ax.set_xticklabels(categories, rotation=20 if len(categories) > 4 else 0, fontsize=8)
    series: dict[Optional[str], list[ObjectivePoint]] = {}
    for point in points:
        series.setdefault(point.series, []).append(point)
    lined = any(len(group) > 1 for group in series.values()) and len(series) <= 12
    if lined:
        for label, group in series.items():
            group.sort(key=lambda p: p.x)
            ax.plot([p.x for p in group], [p.objective for p in group], "-o", label=label)
    else:
        ax.scatter([p.x for p in points], [p.objective for p in points], zorder=3)
    if best is not None:
        ax.scatter([best.x], [best.objective], marker="*", s=220, color="gold", edgecolor="black", zorder=4,
                   label="best")
    if not points:
        ax.text(0.5, 0.5, "no completed job", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(param)
    _finish(ax, title, f"objective ({direction})")
    if lined and any(label for label in series):
        ax.legend(fontsize=8)
    return _save(fig, out_path)
