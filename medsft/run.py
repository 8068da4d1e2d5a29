"""From a composed config to a finished stage: validate, pick the stage, report user errors cleanly."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from medsft.config import validate
from medsft.errors import ConfigError, MedsftError
from medsft.sweep import register_resolvers as register_sweep_resolvers

log = logging.getLogger("medsft")

register_sweep_resolvers()  # conf/config.yaml's hydra.sweep.subdir uses ${medsft_dirname:...}

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def _check_required(cfg: DictConfig) -> None:
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError("required config value(s) not set: " + ", ".join(f"{k}=???" for k in missing)
                          + " (e.g. data.path=/path/to/train.jsonl)")


def _run_dir() -> Path:
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # not under Hydra
        return Path.cwd()


def run(cfg: DictConfig, run_dir: Optional[Path] = None) -> Optional[float]:
    """Validate and run the configured stage; returns the sweep objective. Raises MedsftError on user errors."""
    _check_required(cfg)
    validate(cfg)
    run_dir = Path(run_dir) if run_dir is not None else _run_dir()
    from medsft.launcher import maybe_relaunch  # launcher.num_processes > 1: re-invoked via accelerate launch

    relaunched, objective = maybe_relaunch(cfg, run_dir)
    if relaunched:
        return objective
    if cfg.stage == "sft":
        from medsft.train.loop import train

        return train(cfg, run_dir)
    if cfg.stage == "rl":
        from medsft.rl.trainer import train_rl

        return train_rl(cfg, run_dir)
    raise ConfigError(f"stage={cfg.stage!r} is not available in this version (available: sft, rl)")


def run_from_hydra(cfg: DictConfig) -> Optional[float]:
    """Hydra task function body: user errors print one clear message and exit non-zero, no traceback."""
    from medsft.sweep.job import is_multirun

    if is_multirun():  # per-job checkpoints, final.json, failures recorded (sweep.continue_on_failure)
        from medsft.sweep.job import run_job

        return run_job(cfg, lambda job_cfg, job_dir: run(job_cfg, job_dir))
    try:
        return run(cfg)
    except MedsftError as err:
        print(f"medsft: error: {err}", file=sys.stderr, flush=True)
        from medsft.launcher import record_exit  # a distributed child tells its parent the real exit code

        record_exit(err.exit_code)
        sys.exit(err.exit_code)


def cli_main(argv: list[str]) -> int:
    """`medsft train [overrides]`: the same as `python launch.py [overrides]`."""
    import hydra

    from medsft.config import register_configs

    register_configs()
    sys.argv = ["medsft train", *argv]
    hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")(run_from_hydra)()
    return 0
