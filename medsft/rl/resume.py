"""Which RL checkpoint a run continues from (resume.* as in SFT, medsft.resume_policy), and refusing a resume
whose RL config differs. TRL restores model, optimizer, scheduler, RNG and data position itself.

RL checkpoints are TRL's: `{output_dir}/{experiment_name}/rl_{algorithm}/checkpoint-N/`, complete once
transformers has written their trainer_state.json (it writes it last).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from medsft.config import flatten
from medsft.errors import ConfigError
from medsft.resume_policy import AUTO, FRESH, config_differences, refuse_fresh_start, refuse_inexact, resume_choice
from medsft.rl.trl_glue import CONFIG_FILE

log = logging.getLogger("medsft.rl")

TRAINER_STATE = "trainer_state.json"
# Keys that may change when a run is continued (a longer run, other logging); anything else must match.
_RESUMABLE_CHANGES = {"max_steps", "num_epochs", "eval_every_n_steps", "samples_every_n_steps", "samples_per_write"}


def rl_output_dir(cfg: DictConfig) -> Path:
    return Path(cfg.output_dir).expanduser().resolve() / cfg.experiment_name / f"rl_{cfg.rl.algorithm}"


def complete_checkpoints(out_dir: Path) -> list[Path]:
    """TRL's complete `checkpoint-N` folders in out_dir, oldest first."""
    found = []
    if out_dir.is_dir():
        for child in out_dir.iterdir():
            if child.is_dir() and child.name.startswith("checkpoint-") and child.name[11:].isdigit():
                if (child / TRAINER_STATE).is_file():
                    found.append((int(child.name[11:]), child))
    return [p for _, p in sorted(found)]


def find_rl_checkpoint(cfg: DictConfig, out_dir: Path) -> Optional[str]:
    """The checkpoint to continue from (None: a fresh start); raises ConfigError when unsafe.

    A fresh start with resume.overwrite=true deletes the folder's checkpoints first (main process), so TRL's
    rotation and a later resume=auto can never mistake them for this run's.
    """
    choice = resume_choice(cfg.resume.from_checkpoint)
    existing = complete_checkpoints(out_dir)
    if choice == FRESH:
        refuse_fresh_start(cfg.resume, out_dir, existing)
        if existing and os.environ.get("RANK", "0") == "0":  # the main process deletes, once
            log.warning("resume.overwrite=true: deleting %d checkpoint(s) in %s", len(existing), out_dir)
            for path in existing:
                shutil.rmtree(path, ignore_errors=True)
        return None
    if choice == AUTO:
        path = existing[-1] if existing else None
    else:
        path = Path(str(cfg.resume.from_checkpoint).strip()).expanduser()
        if not (path / TRAINER_STATE).is_file():
            raise ConfigError(f"resume.from_checkpoint={cfg.resume.from_checkpoint}: not a complete RL checkpoint "
                              f"(no {TRAINER_STATE})")
    if path is not None:
        check_resume_config(cfg, path)
    return str(path) if path is not None else None


def rl_fingerprint(cfg: DictConfig) -> dict:
    """The flattened `rl` group (minus resumable changes), model.path and seed."""
    rl = OmegaConf.to_container(cfg.rl, resolve=True)
    flat = flatten({"rl": {k: v for k, v in rl.items() if k not in _RESUMABLE_CHANGES}})
    flat.update({"model.path": cfg.model.path, "seed": cfg.seed})
    return flat


def check_resume_config(cfg: DictConfig, checkpoint: Path) -> None:
    """Refuse to resume a checkpoint written under a different RL config (unless resume.allow_config_change)."""
    saved_path = Path(checkpoint) / CONFIG_FILE
    if not saved_path.is_file():
        return
    saved = OmegaConf.load(saved_path)
    if OmegaConf.select(saved, "rl") is None:
        return
    refuse_inexact(checkpoint, config_differences(rl_fingerprint(saved), rl_fingerprint(cfg)), cfg.resume)
