"""medsft/plots.py, the one plotting style: a run's curves.png and a sweep's plots."""

from __future__ import annotations

from pathlib import Path

from medsft.plots import LossCurve, ObjectivePoint, curves_figure, plot_loss_curves, plot_objective

PNG = b"\x89PNG\r\n\x1a\n"


def _records(steps: int, val_every: int) -> list[dict]:
    records = [{"kind": "val", "step": 0, "val_loss": 6.2}]
    for step in range(1, steps + 1):
        records.append({"kind": "train", "step": step, "loss": 6.0 - 0.1 * step, "lr": 1e-3 * step / steps})
        if step % val_every == 0:
            records.append({"kind": "val", "step": step, "val_loss": 6.1 - 0.1 * step})
    return records


def test_curves_have_a_title_integer_steps_markers_and_the_step_0_validation_loss():
    fig = curves_figure(_records(4, 2), title="demo_smollm2_es")
    ax_loss, ax_lr = fig.axes
    assert ax_loss.get_title() == "Loss per token: demo_smollm2_es" and ax_lr.get_title().startswith("Learning rate")
    train, val = ax_loss.get_lines()[:2]
    assert list(val.get_xdata()) == [0, 2, 4] and val.get_ydata()[0] == 6.2  # measured before training
    assert train.get_marker() == "o" and val.get_marker() == "o"  # every measured point visible
    for ax in (ax_loss, ax_lr):
        ticks = list(ax.get_xticks())
        assert ticks == [int(t) for t in ticks]  # no step 0.5
        assert ax.get_xlabel() == "optimizer step"
    assert list(ax_loss.get_xticks()) == [0, 1, 2, 3, 4]  # a short run: every step ticked
    many = curves_figure(_records(300, 100))
    assert many.axes[0].get_lines()[0].get_marker() in (None, "None", "")  # too many points for markers
    assert curves_figure([{"kind": "val", "step": 0, "val_loss": 1.0}]) is None  # nothing trained yet


def test_the_sweep_plots_share_the_style(tmp_path: Path):
    curves = [LossCurve("#0 lr=1e-5", [1, 2, 3], [3.0, 2.5, 2.2], [0, 3], [3.1, 2.4]),
              LossCurve("#1 lr=5e-6", [1, 2], [3.0, 2.8], complete=False)]
    path = plot_loss_curves(curves, tmp_path / "loss.png", "Loss curves of 2 job(s)")
    assert path.read_bytes()[:8] == PNG
    points = [ObjectivePoint(1e-5, 2.4, "seq=1024"), ObjectivePoint(5e-6, 2.6, "seq=1024")]
    path = plot_objective(points, tmp_path / "obj.png", param="optimizer.learning_rate", direction="minimize",
                          title="Objective vs optimizer.learning_rate", best=points[0])
    assert path.read_bytes()[:8] == PNG
