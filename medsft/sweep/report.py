"""Sweep report: every job of a multirun folder -> a table (markdown + CSV, best first) and PNG plots.

    medsft sweep-report multirun_outputs/<date>/<time> [--out DIR] [--direction minimize|maximize] [--no-plots]
    (the command: medsft/cli/sweep_report.py)

Writes into the sweep folder (or --out):
    report.md                       summary, the table, failures with their error, links to the plots
    report.csv                      the same table, full precision, one row per job (the checkpoint eval's
                                    95% interval as eval_accuracy_ci95_lo / _hi)
    loss_curves.png                 train loss (solid) and validation loss (dashed) of every job on one chart
    objective_vs_<param>.png        the objective against each swept parameter (one file per parameter)

A job folder is any folder holding `.hydra/overrides.yaml`, `metrics.jsonl` or `final.json`. Its status is
`completed` (a summary or a completed final.json), `failed` (final.json says so, with the error) or
`incomplete` (still running, killed, or never got that far). Only completed jobs are ranked.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from medsft import plots as charts
from medsft.config.secrets import redact
from medsft.eval.report import wilson_interval
from medsft.errors import MedsftError
from medsft.outputs import METRICS_FILE, last_summary, read_records
from medsft.outputs import objective as run_objective
from medsft.sweep import FINAL_FILE

METRIC_COLUMNS = (
    "objective",
    "final_train_loss",
    "val_loss_before",
    "val_loss_after",
    "val_loss_drop",
    "format_compliance_after",
    "eval_accuracy",  # the last checkpoint eval (checkpoint.eval_benchmark), shown with its 95% Wilson interval
    "steps",
    "duration_s",
)
_JOB_NUM = re.compile(r"^(\d+)(?:_|$)")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass
class JobResult:
    path: Path
    name: str  # path relative to the sweep folder
    num: Optional[int]
    overrides: list[str]
    params: dict[str, str]  # override key -> value as written on the command line
    status: str  # completed | failed | incomplete
    objective: Optional[float]
    metrics: dict[str, Any] = field(default_factory=dict)
    train: list[dict] = field(default_factory=list)
    val: list[dict] = field(default_factory=list)
    error: Optional[str] = None

    @property
    def rankable(self) -> bool:
        return self.status == "completed" and _finite(self.objective)


@dataclass
class SweepReport:
    sweep_dir: Path
    out_dir: Path
    jobs: list[JobResult]  # best first; failed and incomplete jobs last
    swept: list[str]  # override keys whose value differs between jobs
    common: list[str]  # overrides shared by every job
    direction: str
    files: list[Path] = field(default_factory=list)

    @property
    def failed(self) -> list[JobResult]:
        return [job for job in self.jobs if job.status == "failed"]

    @property
    def best(self) -> Optional[JobResult]:
        return self.jobs[0] if self.jobs and self.jobs[0].rankable else None


# ------------------------------------------------------------------------------------------ reading


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, yaml.YAMLError):
        return None


def split_override(override: str) -> tuple[str, str]:
    """`optimizer.learning_rate=1e-5` -> ("optimizer.learning_rate", "1e-5"); `+x=1` -> ("x", "1")."""
    key, sep, value = str(override).partition("=")
    key = key.lstrip("+~").strip()
    return key, value.strip() if sep else ""


def to_number(value: Any) -> Optional[float]:
    """The value as a float when it is numeric (`1e-5` included, which YAML 1.1 reads as a string)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        number = float(str(value).strip())
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def find_job_dirs(sweep_dir: Path) -> list[Path]:
    """Job folders under sweep_dir (not following links, not descending into a job folder)."""
    sweep_dir = Path(sweep_dir)
    found = []
    for dirpath, dirnames, filenames in os.walk(sweep_dir, followlinks=False):
        here = Path(dirpath)
        is_job = ((here / ".hydra" / "overrides.yaml").is_file() or METRICS_FILE in filenames
                  or FINAL_FILE in filenames)
        if is_job and here != sweep_dir:
            found.append(here)
            dirnames[:] = []
            continue
        # Hydra's own folders, submitit's logs and checkpoint trees hold no jobs.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and not d.startswith("checkpoint"))
    if not found and (
        (sweep_dir / ".hydra" / "overrides.yaml").is_file() or (sweep_dir / METRICS_FILE).is_file()
    ):
        found.append(sweep_dir)  # a single run folder
    return found


def _job_number(job_dir: Path, name: str, final: dict) -> Optional[int]:
    """From final.json, else the folder name's `<num>_` prefix (Hydra's default subdir), else hydra.yaml."""
    if isinstance(final.get("job_num"), int):
        return final["job_num"]
    match = _JOB_NUM.match(name.split("/", 1)[0]) or _JOB_NUM.match(job_dir.name)
    if match:
        return int(match.group(1))
    hydra_cfg = _read_yaml(job_dir / ".hydra" / "hydra.yaml")
    try:
        return int(hydra_cfg["hydra"]["job"]["num"])
    except (TypeError, KeyError, ValueError):
        return None


def read_job(job_dir: Path, sweep_dir: Path) -> JobResult:
    job_dir = Path(job_dir)
    final = _read_json(job_dir / FINAL_FILE)
    overrides = _read_yaml(job_dir / ".hydra" / "overrides.yaml")
    if not isinstance(overrides, list):
        overrides = list(final.get("overrides") or [])
    overrides = [redact(str(o)) for o in overrides]  # a secret never reaches the report (medsft.config.secrets)
    params = dict(split_override(o) for o in overrides)

    records = read_records(job_dir)
    train = [r for r in records if r.get("kind") == "train" and _finite(r.get("step")) and _finite(r.get("loss"))]
    val = [r for r in records if r.get("kind") == "val" and _finite(r.get("step")) and _finite(r.get("val_loss"))]
    summary = last_summary(records)

    metrics = dict(summary)
    metrics.update(_last_checkpoint_eval(records))
    metrics.update({key: value for key, value in final.items() if key in METRIC_COLUMNS or key == "checkpoint_dir"})
    error = None
    status = final.get("status")
    if status == "failed":
        error = redact(str(final.get("error") or "failed (no message)"))
    elif status == "completed" or summary:
        status = "completed"
    else:
        status = "incomplete"
    objective = final.get("objective", summary.get("objective"))
    objective = float(objective) if _finite(objective) else None
    if status == "completed" and objective is None:
        objective = run_objective(metrics)  # a summary without an objective: what the run falls back to
    if status != "completed":
        if train:
            metrics.setdefault("final_train_loss", train[-1]["loss"])
            metrics.setdefault("steps", train[-1]["step"])
    metrics["objective"] = objective
    try:
        name = job_dir.resolve().relative_to(Path(sweep_dir).resolve()).as_posix()
    except ValueError:
        name = job_dir.name
    name = name if name not in ("", ".") else job_dir.name
    return JobResult(
        path=job_dir, name=name, num=_job_number(job_dir, name, final), overrides=overrides,
        params=params, status=status, objective=objective, metrics=metrics, train=train, val=val, error=error,
    )


def _last_checkpoint_eval(records: list[dict]) -> dict:
    """The job's last checkpoint eval (`checkpoint_eval` records of metrics.jsonl): its accuracy, n, benchmark,
    step and the 95% Wilson score interval of the accuracy (from n_correct, or accuracy x n for records that
    predate n_correct: the accuracy is n_correct / n exactly)."""
    evals = [r for r in records if r.get("kind") == "checkpoint_eval" and _finite(r.get("accuracy"))
             and isinstance(r.get("n"), int) and r["n"] > 0]
    if not evals:
        return {}
    last = evals[-1]
    n = last["n"]
    n_correct = last.get("n_correct")
    if not isinstance(n_correct, int):
        n_correct = int(round(last["accuracy"] * n))
    lo, hi = wilson_interval(n_correct, n)
    return {"eval_accuracy": last["accuracy"], "eval_accuracy_ci95": [round(lo, 4), round(hi, 4)], "eval_n": n,
            "eval_benchmark": last.get("benchmark"), "eval_step": last.get("step")}


def eval_cell(metrics: dict) -> str:
    """`12.0% [7.0, 19.8]`: the checkpoint eval's accuracy and its 95% interval, in %."""
    acc, ci = metrics.get("eval_accuracy"), metrics.get("eval_accuracy_ci95")
    if acc is None:
        return ""
    return f"{100 * acc:.1f}%" + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")


def _sweep_direction(sweep_dir: Path) -> str:
    """hydra.sweeper.direction of the sweep (Optuna), else minimize: the objective is a loss."""
    saved = _read_yaml(Path(sweep_dir) / "multirun.yaml")
    try:
        direction = saved["hydra"]["sweeper"]["direction"]
    except (TypeError, KeyError):
        return "minimize"
    if isinstance(direction, list):
        direction = direction[0] if direction else "minimize"
    direction = str(direction).lower().rsplit(".", 1)[-1]
    return direction if direction in ("minimize", "maximize") else "minimize"


def rank_jobs(jobs: list[JobResult], direction: str = "minimize") -> list[JobResult]:
    """Completed jobs best first (ties by job number), then failed, then incomplete."""
    sign = -1.0 if direction == "maximize" else 1.0
    order = {"completed": 0, "failed": 1, "incomplete": 2}

    def key(job: JobResult):
        num = job.num if job.num is not None else 1 << 30
        if job.rankable:
            return (0, sign * job.objective, num, job.name)
        return (1 + order.get(job.status, 2), 0.0, num, job.name)

    return sorted(jobs, key=key)


def collect(sweep_dir: Path, direction: Optional[str] = None) -> tuple[list[JobResult], list[str], list[str], str]:
    sweep_dir = Path(sweep_dir)
    jobs = [read_job(d, sweep_dir) for d in find_job_dirs(sweep_dir)]
    direction = direction or _sweep_direction(sweep_dir)
    jobs = rank_jobs(jobs, direction)
    keys: list[str] = []
    for job in sorted(jobs, key=lambda j: (j.num if j.num is not None else 1 << 30, j.name)):
        keys += [k for k in job.params if k not in keys]
    swept = [k for k in keys if len({job.params.get(k) for job in jobs}) > 1]
    common = [f"{k}={jobs[0].params[k]}" for k in keys if k not in swept and k in jobs[0].params]
    return jobs, swept, common, direction


# ------------------------------------------------------------------------------------------ tables


def format_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    return str(value)


def _md_cell(value: Any) -> str:
    return format_value(value).replace("|", "\\|").replace("\n", " ")


def table_columns(jobs: list[JobResult], swept: list[str]) -> list[str]:
    metric_cols = [c for c in METRIC_COLUMNS if c == "objective" or any(j.metrics.get(c) is not None for j in jobs)]
    return ["rank", "job", "status", *swept, *metric_cols]


def table_rows(jobs: list[JobResult], swept: list[str]) -> list[dict]:
    rows = []
    rank = 0
    for job in jobs:
        rank += job.rankable
        row = {
            "rank": rank if job.rankable else None,
            "job": job.num if job.num is not None else job.name,
            "status": job.status,
            **{key: job.params.get(key) for key in swept},
            **{key: job.metrics.get(key) for key in METRIC_COLUMNS},
            **_eval_extras(job.metrics),
            "overrides": " ".join(job.overrides),
            "job_dir": job.name,
            "error": job.error,
        }
        rows.append(row)
    return rows


def _eval_extras(metrics: dict) -> dict:
    ci = metrics.get("eval_accuracy_ci95") or [None, None]
    return {"eval_accuracy_ci95_lo": ci[0], "eval_accuracy_ci95_hi": ci[1], "eval_n": metrics.get("eval_n"),
            "eval_benchmark": metrics.get("eval_benchmark"), "eval_step": metrics.get("eval_step")}


def write_csv(path: Path, jobs: list[JobResult], swept: list[str]) -> Path:
    columns = table_columns(jobs, swept)
    if "eval_accuracy" in columns:
        at = columns.index("eval_accuracy") + 1
        columns[at:at] = ["eval_accuracy_ci95_lo", "eval_accuracy_ci95_hi", "eval_n", "eval_benchmark", "eval_step"]
    columns += ["overrides", "job_dir", "error"]
    with Path(path).open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in table_rows(jobs, swept):
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return Path(path)


def _short_param(value: Any) -> Any:
    """Optuna's 17-digit floats shown with 4 significant digits in the markdown table (the CSV keeps them)."""
    number = to_number(value)
    if number is None or len(str(value)) <= 8:
        return value
    return f"{number:.4g}"


def markdown_table(jobs: list[JobResult], swept: list[str]) -> str:
    columns = table_columns(jobs, swept)
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for job, row in zip(jobs, table_rows(jobs, swept)):
        cells = [_md_cell(_short_param(row.get(c)) if c in swept else row.get(c)) for c in columns]
        if "eval_accuracy" in columns:
            cells[columns.index("eval_accuracy")] = _md_cell(eval_cell(job.metrics))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_markdown(report: SweepReport, plots: list[Path]) -> Path:
    jobs = report.jobs
    counts = {s: sum(j.status == s for j in jobs) for s in ("completed", "failed", "incomplete")}
    lines = [
        f"# Sweep report: {report.sweep_dir}",
        "",
        f"{len(jobs)} job(s): {counts['completed']} completed, {counts['failed']} failed, "
        f"{counts['incomplete']} incomplete. Objective: final validation loss when the run has a validation "
        f"split, else final train loss ({report.direction}; best first).",
        "",
    ]
    best = report.best
    if best is not None:
        lines += [f"**Best:** job {best.num if best.num is not None else best.name} "
                  f"(objective {format_value(best.objective)}): `{' '.join(best.overrides) or '(no overrides)'}`", ""]
    if report.swept:
        lines += ["Swept: " + ", ".join(f"`{k}`" for k in report.swept), ""]
    if report.common:
        lines += ["Common overrides: `" + " ".join(report.common) + "`", ""]
    evaluated = [j for j in jobs if j.metrics.get("eval_accuracy") is not None]
    if evaluated:
        benches = sorted({str(j.metrics.get("eval_benchmark")) for j in evaluated})
        sizes = sorted({j.metrics["eval_n"] for j in evaluated})
        lines += [f"eval_accuracy: the last checkpoint eval of each job ({', '.join(benches)}, "
                  f"{'/'.join(map(str, sizes))} questions) with its 95% Wilson score interval [lo, hi] in %.", ""]
    lines += [markdown_table(jobs, report.swept), ""]
    failed = report.failed
    if failed:
        lines += ["## Failed jobs", ""]
        for job in failed:
            lines.append(f"- job {job.num if job.num is not None else job.name} (`{job.name}`): "
                         f"{_md_cell(job.error)}")
        lines.append("")
    if plots:
        lines += ["## Plots", ""]
        lines += [f"![{p.stem}]({p.name})" for p in plots]
        lines.append("")
    path = report.out_dir / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------ plots


def _job_label(job: JobResult, swept: list[str]) -> str:
    parts = [f"{k.rsplit('.', 1)[-1]}={_short_param(job.params[k])}" for k in swept if k in job.params]
    head = f"#{job.num}" if job.num is not None else job.name
    tail = "" if job.status == "completed" else f" ({job.status})"
    return " ".join([head, *parts]) + tail


def _curves(jobs: list[JobResult], swept: list[str]) -> list[charts.LossCurve]:
    """Every job with metrics as a loss curve, in job order."""
    plotted = [job for job in sorted(jobs, key=lambda j: (j.num if j.num is not None else 1 << 30, j.name))
               if job.train or job.val]
    return [charts.LossCurve(label=_job_label(job, swept), train_steps=[r["step"] for r in job.train],
                      train_loss=[r["loss"] for r in job.train], val_steps=[r["step"] for r in job.val],
                      val_loss=[r["val_loss"] for r in job.val], complete=job.status == "completed")
            for job in plotted]


def plot_loss_curves(jobs: list[JobResult], swept: list[str], path: Path) -> Path:
    """Every job's train loss (solid) and validation loss (dashed, markers) against optimizer step
    (medsft.plots: the style of a run's curves.png)."""
    curves = _curves(jobs, swept)
    hidden = len(jobs) - len(curves)
    title = f"Loss curves of {len(curves)} job(s)" + (f" ({hidden} without metrics not shown)" if hidden else "")
    return charts.plot_loss_curves(curves, path, title)


def plot_objective_vs(jobs: list[JobResult], param: str, swept: list[str], path: Path, direction: str) -> Path:
    """Objective against one swept parameter; points sharing the other swept values are joined by a line."""
    done = [job for job in jobs if job.rankable and param in job.params]
    numbers = [to_number(job.params[param]) for job in done]
    numeric = bool(done) and all(n is not None for n in numbers)
    categories = None
    log_x = False
    if numeric:
        xs = numbers
        positive = [x for x in xs if x > 0]
        log_x = len(positive) == len(xs) and len(set(xs)) > 1 and max(xs) / min(xs) >= 9.99
    else:
        values = sorted({job.params[param] for job in done}, key=lambda v: (to_number(v) is None, to_number(v) or 0, v))
        index = {value: i for i, value in enumerate(values)}
        xs = [float(index[job.params[param]]) for job in done]
        categories = [str(_short_param(v)) for v in values]
    others = [k for k in swept if k != param]
    points = [charts.ObjectivePoint(x=x, objective=job.objective,
                                   series=", ".join(f"{k.rsplit('.', 1)[-1]}={_short_param(job.params.get(k))}"
                                                    for k in others) or None)
              for job, x in zip(done, xs)]
    best = None
    if done:
        best_job = min(done, key=lambda j: j.objective if direction != "maximize" else -j.objective)
        best = points[done.index(best_job)]
    return charts.plot_objective(points, path, param=param, direction=direction, categories=categories, log_x=log_x,
                                best=best, title=f"Objective vs {param} ({len(done)} completed job(s))")


def plot_filename(param: str) -> str:
    return f"objective_vs_{_UNSAFE.sub('_', param).strip('_') or 'param'}.png"


# ------------------------------------------------------------------------------------------ entry points


def write_report(
    sweep_dir: Path | str,
    out_dir: Path | str | None = None,
    direction: Optional[str] = None,
    plots: bool = True,
) -> SweepReport:
    """Read every job of the sweep and write report.md, report.csv and the PNG plots; returns the report."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise MedsftError(f"sweep folder not found: {sweep_dir}")
    jobs, swept, common, direction = collect(sweep_dir, direction)
    if not jobs:
        raise MedsftError(
            f"no job folders in {sweep_dir} (a job folder holds .hydra/overrides.yaml, metrics.jsonl or {FINAL_FILE})"
        )
    out = Path(out_dir) if out_dir is not None else sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    report = SweepReport(sweep_dir=sweep_dir, out_dir=out, jobs=jobs, swept=swept, common=common, direction=direction)
    pngs: list[Path] = []
    if plots:
        pngs.append(plot_loss_curves(jobs, swept, out / "loss_curves.png"))
        for param in swept:
            pngs.append(plot_objective_vs(jobs, param, swept, out / plot_filename(param), direction))
    report.files = [write_markdown(report, pngs), write_csv(out / "report.csv", jobs, swept), *pngs]
    return report
