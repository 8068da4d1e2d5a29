"""Hydra callback (conf/config.yaml, hydra.callbacks.sweep): the report at the end of a multirun, and its exit code.

- on_job_end: a job that Hydra saw fail (an exception that escaped the task function, e.g. with
  `sweep.continue_on_failure=false` or another task function) gets a `final.json` with its error, like the
  failures medsft.sweep.job records itself. Runs where the job runs (a SLURM node with submitit).
- on_multirun_end: writes report.md / report.csv / PNG plots into the sweep folder (`sweep.report=false`
  turns it off; a broken report never hides the sweep's result), prints the best job, and ends the process
  with exit code 1 when any job failed. Everything is read back from the job folders, so it works the same
  whether the jobs ran in this process (basic launcher) or elsewhere (submitit).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from hydra.core.utils import JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from medsft.sweep import FINAL_FILE
from medsft.sweep.job import write_final
from medsft.sweep.report import collect, write_report

log = logging.getLogger("medsft.sweep")


def _mode_is_multirun(config: DictConfig) -> bool:
    mode = OmegaConf.select(config, "hydra.mode", default=None)
    return mode == RunMode.MULTIRUN or str(mode).endswith("MULTIRUN")


class SweepCallback(Callback):
    def __init__(self, fail_exit_code: int = 1, report: bool = True) -> None:
        self.fail_exit_code = int(fail_exit_code)
        self.report = bool(report)

    # -------------------------------------------------------------------------------- per job (remote too)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if not _mode_is_multirun(config) or getattr(job_return, "status", None) != JobStatus.FAILED:
            return
        job_dir = Path(str(OmegaConf.select(config, "hydra.runtime.output_dir")))
        if (job_dir / FINAL_FILE).is_file():
            return
        err = job_return._return_value
        try:
            write_final(job_dir, {
                "status": "failed",
                "job_num": OmegaConf.select(config, "hydra.job.num"),
                "overrides": list(getattr(job_return, "overrides", None) or []),
                "error": str(err) or type(err).__name__,
                "error_type": type(err).__name__,
                "objective": None,
            })
        except OSError as problem:
            log.warning("could not record the failure of %s: %s", job_dir, problem)

    # -------------------------------------------------------------------------------- end of the sweep

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(OmegaConf.select(config, "hydra.sweep.dir")))
        wanted = self.report and OmegaConf.select(config, "sweep.report") is not False  # absent: the callback's own
        failed: list[str] = []
        try:
            jobs = collect(sweep_dir)[0]
            failed = [f"job {j.num if j.num is not None else j.name}: {j.error}" for j in jobs if j.status == "failed"]
        except Exception as problem:  # noqa: BLE001
            log.warning("could not read the jobs of %s: %s", sweep_dir, problem)
        if wanted:
            try:
                report = write_report(sweep_dir)
                best = report.best
                print(f"\nmedsft: sweep report: {sweep_dir / 'report.md'} ({len(report.jobs)} jobs)", flush=True)
                if best is not None:
                    print(f"medsft: best job {best.num} objective {best.objective:.6g}: {' '.join(best.overrides)}",
                          flush=True)
            except Exception as problem:  # noqa: BLE001 - the report must not hide the sweep's result
                log.warning("sweep report of %s not written: %s", sweep_dir, problem)
                print(f"medsft: sweep report not written: {problem}", file=sys.stderr, flush=True)
        if failed:
            print(f"medsft: {len(failed)} sweep job(s) failed:\n  " + "\n  ".join(failed), file=sys.stderr, flush=True)
            if self.fail_exit_code:
                sys.exit(self.fail_exit_code)
