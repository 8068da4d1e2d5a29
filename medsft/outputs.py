"""The run-output contract: what every run (SFT or RL, one process or many) leaves in its run folder, and the
one reader of it that the launcher, sweeps and reports share.

    <run dir>/metrics.jsonl   one JSON object per line; its "kind" says what it is:
        train            a logged window of steps (SFT: loss, token_acc, lr, grad_norm, tokens/s, ...;
                         RL: TRL's figures: reward, kl, entropy, ...)
        val              the validation loss at a step (SFT)
        data             the training data at the start of a run (SFT): examples, tokens, and per source of a
                         mixture its records, examples and tokens (medsft.data.mixture.data_record)
        eval             TRL's evaluation figures at a step (RL)
        generation       the before/after answers to held-out questions (SFT)
        checkpoint_eval  a benchmark eval of a saved checkpoint (SFT)
        summary          the last line of a finished run: its final figures and its "objective"

The objective is what a sweep ranks: for SFT the final validation loss when there is a validation split,
else the final train loss; for RL the mean reward of the last logged steps.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

METRICS_FILE = "metrics.jsonl"
SUMMARY_KIND = "summary"
# Where an older or partial summary has no "objective": the figures it falls back to, in order.
_OBJECTIVE_FALLBACKS = ("val_loss_after", "final_train_loss")


class MetricsFile:
    """Append-only `metrics.jsonl`, written on the main process only; one JSON object per line, flushed at each
    write so a killed run leaves every line but (at worst) the one being written."""

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

    def write_summary(self, figures: dict, objective: Optional[float]) -> dict:
        """The run's last record: its final figures and the objective a sweep ranks it by."""
        record = {"kind": SUMMARY_KIND, **figures, "objective": objective}
        self.write(record)
        return record


def metrics_path(run_dir: Path) -> Path:
    return Path(run_dir) / METRICS_FILE


def read_records(path: Path) -> list[dict]:
    """The records of a metrics.jsonl (a file, or the run folder holding one); a line cut short by a killed
    run is skipped, not fatal; a missing file has none."""
    path = Path(path)
    if path.is_dir():
        path = metrics_path(path)
    records = []
    try:
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                line = line.strip()
                if not line:
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict):
                    records.append(record)
    except FileNotFoundError:
        pass
    return records


def last_summary(records: list[dict]) -> dict:
    """The figures of the last summary record (without its "kind"), or {} for a run that did not finish."""
    summaries = [r for r in records if r.get("kind") == SUMMARY_KIND]
    return {k: v for k, v in (summaries[-1] if summaries else {}).items() if k != "kind"}


def objective(summary: dict) -> Optional[float]:
    """The summary's objective (finite), else the figure a run falls back to (validation, else train loss)."""
    for key in ("objective", *_OBJECTIVE_FALLBACKS):
        value = summary.get(key)
        if _finite(value):
            return float(value)
    return None


def summary_of(run_dir: Path) -> dict:
    return last_summary(read_records(metrics_path(run_dir)))


def objective_of(run_dir: Path) -> Optional[float]:
    """The objective of the run in `run_dir` (None when it wrote no summary)."""
    summary = summary_of(run_dir)
    return objective(summary) if summary else None


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
