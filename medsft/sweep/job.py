"""What runs inside one job of a multirun (called by medsft.run.run_from_hydra in MULTIRUN mode).

- Checkpoints get a folder of their own per job (`sweep.checkpoints`): with `output_dir` (default) they go to
  `{output_dir}/sweeps/<sweep id>/<job subdir>/{experiment_name}/checkpoint-*` and the job folder gets a
  `checkpoints` link to it; with `job_dir` they go inside the job folder. Without this every job of a sweep
  would share `{output_dir}/{experiment_name}` and the second job would resume from the first one's
  checkpoint (resume.from_checkpoint=auto) or refuse to start.
- `final.json` in the job folder: status, objective, the run's summary, duration; or the error of a failed job.
- A failing job (any exception) is recorded there and, with `sweep.continue_on_failure=true` (default), the
  sweep goes on: the job returns None, which Hydra's basic sweeper accepts and the Optuna sweeper records as a
  failed trial. The callback (callbacks.py) makes the sweep's exit code non-zero afterwards. With
  `sweep.continue_on_failure=false` the first failure stops the sweep (exit code of the error).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

from accelerate.state import AcceleratorState, GradientState
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, read_write

from medsft.config.secrets import redact
from medsft.errors import ConfigError, MedsftError
from medsft.runtime.startup import PREEMPTED_EXIT_CODE
from medsft.outputs import summary_of
from medsft.sweep import CHECKPOINT_LINK, FINAL_FILE
from medsft.sweep.report import write_report

log = logging.getLogger("medsft.sweep")

CHECKPOINT_PLACES = ("output_dir", "job_dir")


def is_multirun() -> bool:
    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:  # not under Hydra
        return False


def sweep_settings(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg.sweep, resolve=True)


def sweep_id(sweep_dir: Path) -> str:
    """`multirun_outputs/2026-11-29/10-00-00` -> `2026-11-29_10-00-00` (the folder's last two parts)."""
    parts = [p for p in Path(sweep_dir).parts if p not in ("/", "")]
    return "_".join(parts[-2:]) if parts else "sweep"


def job_checkpoint_output_dir(cfg: DictConfig, sweep_dir: Path, job_dir: Path, place: str) -> Path:
    """The output_dir that gives this job its own checkpoint root (`{output_dir}/{experiment_name}`)."""
    if place not in CHECKPOINT_PLACES:
        raise ConfigError(f"sweep.checkpoints={place!r} is not one of {list(CHECKPOINT_PLACES)}")
    if place == "job_dir":
        return job_dir / CHECKPOINT_LINK
    try:
        subdir = job_dir.resolve().relative_to(sweep_dir.resolve()).as_posix()
    except ValueError:
        subdir = job_dir.name
    return Path(cfg.output_dir).expanduser().resolve() / "sweeps" / sweep_id(sweep_dir) / subdir


def _link_checkpoints(job_dir: Path, ckpt_root: Path) -> None:
    """`<job>/checkpoints` -> the job's checkpoint root (a text file holding the path where links fail)."""
    link = job_dir / CHECKPOINT_LINK
    if link.resolve() == ckpt_root.resolve() or link.exists() and not link.is_symlink():
        return
    ckpt_root.mkdir(parents=True, exist_ok=True)
    try:
        if link.is_symlink():
            link.unlink()
        link.symlink_to(ckpt_root, target_is_directory=True)
    except OSError:
        (job_dir / f"{CHECKPOINT_LINK}.txt").write_text(str(ckpt_root) + "\n", encoding="utf-8")


def write_final(job_dir: Path, record: dict) -> Path:
    """final.json, atomically; any token-like text in it (an override, an error message) redacted."""
    path = Path(job_dir) / FINAL_FILE
    tmp = path.with_suffix(".json.tmp")
    text = redact(json.dumps(record, indent=2, ensure_ascii=False, default=str))
    tmp.write_text(text + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def _float_or_none(value) -> Optional[float]:
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _reset_accelerate() -> None:
    """Jobs of the basic launcher share one process: forget the previous job's accelerate singletons."""
    try:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    except AttributeError:  # a private accelerate API: if it changed, there is nothing to reset
        pass


def run_job(cfg: DictConfig, run_fn: Callable[[DictConfig, Path], Optional[float]]) -> Optional[float]:
    """Run one multirun job with `run_fn(cfg, job_dir)`; returns its objective, or None when it failed."""
    hydra_cfg = HydraConfig.get()
    job_dir = Path(hydra_cfg.runtime.output_dir)
    sweep_dir = Path(hydra_cfg.sweep.dir)
    overrides = list(hydra_cfg.overrides.task)
    settings = sweep_settings(cfg)
    started = time.time()
    record: dict = {"job_num": hydra_cfg.job.num, "overrides": overrides}
    ckpt_root: Optional[Path] = None
    _reset_accelerate()
    try:
        ckpt_output_dir = job_checkpoint_output_dir(cfg, sweep_dir, job_dir, str(settings["checkpoints"]))
        with read_write(cfg):
            cfg.output_dir = str(ckpt_output_dir)
        ckpt_root = ckpt_output_dir / str(cfg.experiment_name)
        if settings["checkpoints"] == "output_dir":
            _link_checkpoints(job_dir, ckpt_root)
        record["checkpoint_dir"] = str(ckpt_root)
        objective = run_fn(cfg, job_dir)
    except KeyboardInterrupt:
        raise
    except (Exception, SystemExit) as err:  # noqa: BLE001 - any failure of a job is recorded
        if isinstance(err, SystemExit) and err.code in (0, None):
            objective = None  # a clean exit without a result
        else:
            _drop_empty_checkpoint_root(job_dir, ckpt_root)
            if ckpt_root is not None and not ckpt_root.exists():
                record["checkpoint_dir"] = None
            return _failed(err, job_dir, sweep_dir, record, started, settings)
    finally:
        _reset_accelerate()
    summary = summary_of(job_dir)
    objective = _float_or_none(objective if objective is not None else summary.get("objective"))
    write_final(job_dir, {
        "status": "completed",
        **record,
        **summary,
        "objective": objective,
        "duration_s": round(time.time() - started, 3),
    })
    return objective


def _drop_empty_checkpoint_root(job_dir: Path, ckpt_root: Optional[Path]) -> None:
    """A job that failed before saving anything leaves no empty checkpoint folder nor a link to it."""
    if ckpt_root is None or not ckpt_root.is_dir() or any(ckpt_root.iterdir()):
        return
    try:
        ckpt_root.rmdir()
        ckpt_root.parent.rmdir()  # the job's own level; fails harmlessly when something else is there
    except OSError:
        pass
    link = job_dir / CHECKPOINT_LINK
    if link.is_symlink() and not link.exists():
        link.unlink()


def _failed(err: BaseException, job_dir: Path, sweep_dir: Path, record: dict, started: float, settings: dict) -> None:
    if isinstance(err, SystemExit):
        message, exit_code = f"exited with code {err.code}", err.code if isinstance(err.code, int) else 1
    else:
        message = str(err) or type(err).__name__
        exit_code = getattr(err, "exit_code", 1)
    preempted = exit_code == PREEMPTED_EXIT_CODE
    write_final(job_dir, {
        "status": "preempted" if preempted else "failed",
        **record,
        "error": message,
        "error_type": type(err).__name__,
        "exit_code": exit_code,
        "traceback": "".join(traceback.format_exception(err))[-20000:],
        "objective": None,
        "duration_s": round(time.time() - started, 3),
    })
    where = " ".join(record.get("overrides") or []) or str(job_dir)
    print(redact(f"medsft: sweep job {record.get('job_num')} failed ({where}): {message}"), file=sys.stderr,
          flush=True)
    if preempted:  # the whole sweep is being stopped (a scheduler's SIGTERM): end it with 75, not the next job
        print(f"medsft: preempted: stopping the sweep (exit code {PREEMPTED_EXIT_CODE})", file=sys.stderr, flush=True)
        sys.exit(PREEMPTED_EXIT_CODE)
    if not isinstance(err, MedsftError):
        log.error("sweep job %s failed", record.get("job_num"), exc_info=err)
    if not settings["continue_on_failure"]:
        print("medsft: sweep.continue_on_failure=false: stopping the sweep", file=sys.stderr, flush=True)
        if settings["report"]:
            try:
                write_report(sweep_dir)
            except Exception as problem:  # noqa: BLE001 - the job's own error matters more
                log.warning("sweep report not written: %s", problem)
        if isinstance(err, (MedsftError, SystemExit)):
            sys.exit(exit_code)
        raise err
    return None
