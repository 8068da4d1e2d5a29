"""Resume policy: which checkpoint (if any) a run continues from, and refusing resumes that cannot be exact."""

from __future__ import annotations

import logging
from pathlib import Path

from medsft.errors import ConfigError
from medsft.train import checkpoint as ckpt

log = logging.getLogger("medsft.resume")

_FRESH = ("never", "false", "no", "none", "")


def find_resume_checkpoint(resume_cfg, ckpt_root: Path) -> Path | None:
    """The checkpoint to continue from, or None for a fresh start; raises ConfigError when unsafe."""
    choice = str(resume_cfg.from_checkpoint).strip()
    if choice.lower() in _FRESH:
        existing = ckpt.list_complete_checkpoints(ckpt_root)
        if existing and not resume_cfg.overwrite:
            raise ConfigError(
                f"resume.from_checkpoint={choice!r} but {ckpt_root} already holds {len(existing)} checkpoint(s) "
                f"(newest {existing[-1].name}); pass resume.overwrite=true to start fresh there, or change "
                f"experiment_name / output_dir"
            )
        return None
    if choice.lower() == "auto":
        return ckpt.latest_complete_checkpoint(ckpt_root)
    path = Path(choice).expanduser()
    if not (path / ckpt.COMPLETE_MARKER).is_file():
        raise ConfigError(f"resume.from_checkpoint={choice}: not a complete medsft checkpoint (no {ckpt.COMPLETE_MARKER})")
    return path


def config_differences(saved: dict, current: dict) -> list[str]:
    return [f"{key}: checkpoint {saved.get(key)!r} != now {current.get(key)!r}"
            for key in sorted(set(saved) | set(current)) if saved.get(key) != current.get(key)]


def maybe_resume(ctx) -> None:
    """Load model/optimizer/scheduler/RNG state and the data position from the chosen checkpoint."""
    from medsft.train.loop import TrainState, run_fingerprint

    cfg = ctx.cfg
    path = find_resume_checkpoint(cfg.resume, ctx.ckpt_root)
    if path is None:
        return
    saved = ckpt.read_trainer_state(path)
    differences = config_differences(saved.get("fingerprint", {}), run_fingerprint(ctx))
    if differences and not cfg.resume.allow_config_change:
        raise ConfigError(
            f"cannot resume exactly from {path}: the run differs in\n  - " + "\n  - ".join(differences)
            + "\npass resume.allow_config_change=true to continue anyway, or resume.from_checkpoint=never "
              "resume.overwrite=true to start over"
        )
    ctx.accelerator.load_state(str(path / ckpt.TRAINING_STATE_DIR))
    fields = {k: v for k, v in saved.items() if k in TrainState.__dataclass_fields__}
    ctx.state = TrainState(**fields)
    done = ctx.state.global_step >= ctx.plan.total_steps
    log.info("resumed from %s at step %d (epoch %d)%s", path, ctx.state.global_step, ctx.state.epoch,
             "; training was already complete (resume.from_checkpoint=never resume.overwrite=true starts over)"
             if done else "")
