"""From a composed config to a finished stage: validate, relaunch as a distributed job when asked, pick the stage,
report user errors cleanly."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Optional

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from medsft.config import validate
from medsft.config.presets import experiment_notice
from medsft.errors import ConfigError, MedsftError, output_error_from_os_error
from medsft.models import check_model_source, require_4bit_support
from medsft.runtime.cluster import LAUNCH_DIR_ENV
from medsft.runtime.relaunch import maybe_relaunch, record_exit
from medsft.runtime.workspace import claim_outputs
from medsft.sweep import register_resolvers as register_sweep_resolvers
from medsft.sweep.job import is_multirun, run_job
from medsft.train.loop import train

register_sweep_resolvers()  # conf/config.yaml's hydra.sweep.subdir uses ${medsft_dirname:...}

log = logging.getLogger("medsft.run")


def _check_required(cfg: DictConfig) -> None:
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError("required config value(s) not set: " + ", ".join(f"{k}=???" for k in missing)
                          + " (e.g. data.path=/path/to/train.jsonl)")


def _run_dir() -> Path:
    try:
        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # not under Hydra
        return Path.cwd()


def run(cfg: DictConfig, run_dir: Optional[Path] = None) -> Optional[float]:
    """Validate and run the configured stage; returns the sweep objective. Raises MedsftError on user errors."""
    try:
        return _run(cfg, run_dir)
    except OSError as err:  # a full disk, a read-only or forbidden path: the user's to fix, said plainly
        user_error = output_error_from_os_error(err)
        if user_error is None:
            raise
        raise user_error from err


def _run(cfg: DictConfig, run_dir: Optional[Path]) -> Optional[float]:
    _check_required(cfg)
    validate(cfg)
    require_4bit_support(cfg.peft, cpu=bool(cfg.launcher.cpu))  # QLoRA: CUDA + bitsandbytes, before any model loads
    check_model_source(cfg.model)  # a local model folder that lacks files fails now, not after the data
    run_dir = Path(run_dir) if run_dir is not None else _run_dir()
    with claim_outputs(cfg, run_dir):  # writable output locations; one run per experiment folder (locked)
        relaunched, objective = maybe_relaunch(cfg, run_dir)  # launcher.num_processes > 1: via accelerate launch
        if relaunched:
            return objective
        if cfg.stage == "sft":
            return train(cfg, run_dir)
        if cfg.stage == "rl":
            from medsft.rl.trainer import train_rl  # the optional extra `rl` (trl)

            return train_rl(cfg, run_dir)
    raise ConfigError(f"stage={cfg.stage!r} is not available in this version (available: sft, rl)")


def _say_experiment(cfg: DictConfig) -> None:
    """Which experiment preset this run composed with (once: not again in the processes it relaunches)."""
    if os.environ.get(LAUNCH_DIR_ENV) or os.environ.get("RANK", "0") != "0":
        return
    line, warning = experiment_notice(cfg, HydraConfig.get().overrides.task)
    log.info(line)
    if warning:
        log.warning(warning)


def run_from_hydra(cfg: DictConfig) -> Optional[float]:
    """Hydra task function body: user errors print one clear message and exit non-zero, no traceback."""
    _say_experiment(cfg)
    if is_multirun():  # per-job checkpoints, final.json, failures recorded (sweep.continue_on_failure)
        return run_job(cfg, lambda job_cfg, job_dir: run(job_cfg, job_dir))
    try:
        return run(cfg)
    except MedsftError as err:
        print(f"medsft: error: {err}", file=sys.stderr, flush=True)
        record_exit(err.exit_code)  # a distributed child tells its parent the real exit code
        sys.exit(err.exit_code)
