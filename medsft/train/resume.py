"""Resume policy: which checkpoint (if any) a run continues from, refusing resumes that cannot be exact, and
restoring everything the next step depends on.

resume.from_checkpoint:
    auto (default)  the newest COMPLETE checkpoint under {output_dir}/{experiment_name} that is intact (sizes and
                    checksums as written, medsft.train.integrity; damaged newer ones are set aside, saying so),
                    else a fresh start; when that checkpoint is the run's last step, the run is reported
                    complete and nothing trains
    never           a fresh start; refused when the checkpoint folder already holds checkpoints, unless
                    resume.overwrite=true (then they are deleted first, so they can never be mistaken for this
                    run's checkpoints by rotation or by a later resume=auto)
    <path>          that checkpoint; refused when the checkpoint folder holds newer ones (a later resume=auto
                    would pick them up), unless resume.overwrite=true (then those newer ones are deleted)

A resume is exact (same losses, same weights, bitwise on one process) because the checkpoint holds the model,
optimizer, LR scheduler and grad scaler (accelerate's save_state), every process's RNG states, the position in
the data (epoch + optimizer steps done in it; the order itself is a pure function of the seed, see batches.py),
the counters and the metric window not yet logged. Resuming with a config that changes what is computed is
refused, naming the differing keys, unless resume.allow_config_change=true.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from accelerate.utils import load
from accelerate.utils.constants import RNG_STATE_NAME

from medsft.errors import ConfigError, OutputError
from medsft.resume_policy import (
    AUTO,
    FRESH,
    config_differences,
    refuse_fresh_start,
    refuse_inexact,
    resume_choice,
    saved_config_differences,
)
from medsft.train import checkpoint as ckpt
from medsft.train import integrity
from medsft.train.adapter_checkpoint import load_state_kwargs as adapter_load_state_kwargs
from medsft.train.state import TrainState, run_fingerprint

log = logging.getLogger("medsft.resume")

# Config keys (dotted prefixes) that do not change what training computes: where things are written, how
# they are logged, launched or checkpointed, and labels. Every other key must match for an exact resume.
# The data file's path is ignored but its content hash is compared (run_fingerprint), so a moved file resumes.
IGNORED_CONFIG_KEYS = (
    "defaults", "experiment_name", "output_dir", "log_dir", "push_to_hub", "hf_repo_id", "hub_private",
    "resume", "checkpoint", "logging", "launcher", "generation_check", "sweep",
    "model.name", "model.cache_dir", "data.name", "data.path", "data.format", "data.file_type", "data.val_path",
    "data.cache_dir", "data.num_workers", "data.num_proc", "train.eval_every_n_steps", "train.max_consecutive_skips",
    "train.cpu_malloc_mmap_threshold_mb",
)


@dataclass
class Resumed:
    """What maybe_resume restored; the loop uses it right before its first step."""

    path: Path
    complete: bool
    window: dict = field(default_factory=dict)
    rng: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- choosing


def find_resume_checkpoint(resume_cfg, ckpt_root: Path) -> Path | None:
    """The checkpoint to continue from, or None for a fresh start; raises ConfigError when unsafe.

    Pure: deletes nothing (maybe_resume does, on the main process, when resume.overwrite=true).
    """
    return _choose(resume_cfg, ckpt_root)[0]


def _problems(path: Path) -> list[str]:
    return integrity.checkpoint_problems(path, ckpt.STATE_FILE, ckpt.TRAINING_STATE_DIR)


def _choose(resume_cfg, ckpt_root: Path) -> tuple[Optional[Path], list[Path]]:
    """(the checkpoint to continue from or None, the damaged newer ones resume=auto skipped). Every checkpoint
    is verified before use (medsft.train.integrity); resume=auto falls back to the newest intact one."""
    choice = str(resume_cfg.from_checkpoint).strip()
    existing = ckpt.list_complete_checkpoints(ckpt_root)
    if resume_choice(choice) == FRESH:
        refuse_fresh_start(resume_cfg, ckpt_root, existing)
        return None, []
    if resume_choice(choice) == AUTO:
        damaged: list[tuple[Path, list[str]]] = []
        for candidate in reversed(existing):
            problems = _problems(candidate)
            if not problems:
                for bad, why in damaged:
                    log.warning("checkpoint %s is damaged (%s): resuming from %s instead", bad, "; ".join(why),
                                candidate.name)
                return candidate, [bad for bad, _ in damaged]
            damaged.append((candidate, problems))
        if damaged:
            raise OutputError(
                f"no intact checkpoint to resume from in {ckpt_root}: "
                + "; ".join(f"{bad.name}: {', '.join(why)}" for bad, why in damaged)
                + ". Start over with resume.from_checkpoint=never resume.overwrite=true (deletes them), or move "
                  "them away"
            )
        return None, []
    path = Path(choice).expanduser().resolve()
    if not (path / ckpt.COMPLETE_MARKER).is_file():
        raise ConfigError(f"resume.from_checkpoint={choice}: not a complete medsft checkpoint (no "
                          f"{ckpt.COMPLETE_MARKER} file in it)")
    problems = _problems(path)
    if problems:
        raise OutputError(f"resume.from_checkpoint={choice}: the checkpoint is damaged: {'; '.join(problems)}")
    newer = _newer_than(path, existing)
    if newer and not resume_cfg.overwrite:
        raise ConfigError(
            f"resume.from_checkpoint={choice} is older than {len(newer)} checkpoint(s) in {ckpt_root} "
            f"({', '.join(p.name for p in newer)}); the resumed run would mix with them (rotation, resume=auto). "
            f"Pass resume.overwrite=true to delete them, or resume into another experiment_name / output_dir"
        )
    return path, []


def _newer_than(path: Path, existing: list[Path]) -> list[Path]:
    step = int(ckpt.read_trainer_state(path).get("global_step", 0))
    return [p for p in existing if p.resolve() != path and (ckpt.checkpoint_step(p) or 0) > step]


def _to_delete(resume_cfg, ckpt_root: Path, path: Optional[Path]) -> list[Path]:
    """Checkpoints resume.overwrite=true removes: all for a fresh start, the newer ones for a given path."""
    if not resume_cfg.overwrite:
        return []
    existing = ckpt.list_complete_checkpoints(ckpt_root)
    if path is None:
        return existing
    if resume_choice(resume_cfg.from_checkpoint) == AUTO:
        return []
    return _newer_than(path, existing)


# ----------------------------------------------------------------------------------------------- exactness


def exactness_differences(path: Path, saved_state: dict, fingerprint: dict, cfg) -> list[str]:
    """What differs between the checkpoint's run and this one in ways that change the computation."""
    config_diffs = saved_config_differences(Path(path) / ckpt.CONFIG_FILE, cfg, IGNORED_CONFIG_KEYS)
    named = {line.split(":", 1)[0] for line in config_diffs}
    fingerprint_diffs = [line for line in config_differences(saved_state.get("fingerprint", {}), fingerprint)
                         if not any(k == line.split(":", 1)[0] or k.endswith("." + line.split(":", 1)[0])
                                    for k in named)]
    return fingerprint_diffs + config_diffs


# ----------------------------------------------------------------------------------------------- RNG


def rng_snapshot() -> dict:
    snapshot = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        snapshot["cuda"] = torch.cuda.get_rng_state_all()
    return snapshot


def restore_rng(snapshot: dict) -> None:
    if not snapshot:
        return
    random.setstate(snapshot["python"])
    np.random.set_state(snapshot["numpy"])
    torch.set_rng_state(snapshot["torch"])
    if "cuda" in snapshot:
        torch.cuda.set_rng_state_all(snapshot["cuda"])


def _check_rng_file(path: Path, process_index: int) -> None:
    """accelerate's load_state only logs (at info level) when a process's RNG file is missing or unreadable."""
    rng_file = Path(path) / ckpt.TRAINING_STATE_DIR / f"{RNG_STATE_NAME}_{process_index}.pkl"
    if not rng_file.is_file():
        log.warning("%s has no RNG state for process %d (different number of processes?): this process continues "
                    "with its current RNG, so dropout differs from an uninterrupted run", path, process_index)
        return
    states = load(rng_file)
    if not torch.equal(states["torch_manual_seed"], torch.get_rng_state()):
        raise RuntimeError(f"the torch RNG state of process {process_index} was not restored from {rng_file}")


# ----------------------------------------------------------------------------------------------- resume


def maybe_resume(ctx) -> Optional[Resumed]:
    """Load model/optimizer/scheduler/scaler/RNG state and the data position from the chosen checkpoint.

    Returns None for a fresh start. Collective: every process must call it.
    """
    cfg, accelerator = ctx.cfg, ctx.accelerator
    path, damaged = _choose(cfg.resume, ctx.ckpt_root)
    doomed = _to_delete(cfg.resume, ctx.ckpt_root, path)
    if path is not None:
        saved = ckpt.read_trainer_state(path)
        differences = exactness_differences(path, saved, run_fingerprint(cfg, ctx.data, accelerator.num_processes),
                                            cfg)
        refuse_inexact(path, differences, cfg.resume)
        if differences:
            log.warning("resuming from %s with a changed config (resume.allow_config_change=true): %s", path,
                        "; ".join(differences))
    accelerator.wait_for_everyone()  # every process has decided before anything is deleted
    if damaged and accelerator.is_main_process:  # never counted again (rotation, resume=auto); kept to inspect
        for bad in damaged:
            log.warning("damaged checkpoint %s set aside as %s", bad.name, integrity.set_aside(bad).name)
    if doomed and accelerator.is_main_process:
        log.warning("resume.overwrite=true: deleting %d checkpoint(s) in %s: %s", len(doomed), ctx.ckpt_root,
                    ", ".join(p.name for p in doomed))
        ckpt.remove_checkpoints(doomed)
    accelerator.wait_for_everyone()
    if path is None:
        return None

    # In place: the loop holds a reference to ctx.state.
    for key, value in saved.items():
        if key in TrainState.__dataclass_fields__:
            setattr(ctx.state, key, value)
    if ctx.state.global_step >= ctx.plan.total_steps or ctx.state.epoch >= ctx.plan.epochs:
        return Resumed(path=path, complete=True)  # nothing to train: the (large) training state is not loaded
    accelerator.load_state(str(path / ckpt.TRAINING_STATE_DIR), **adapter_load_state_kwargs(accelerator, ctx.model))
    _check_rng_file(path, accelerator.process_index)
    log.info("resumed from %s at step %d of %d (epoch %d, %d steps done in it)", path, ctx.state.global_step,
             ctx.plan.total_steps, ctx.state.epoch, ctx.state.step_in_epoch)
    return Resumed(path=path, complete=False, window=saved.get("metric_window") or {}, rng=rng_snapshot())


def report_complete(ctx, resumed: Resumed) -> Optional[float]:
    """The newest checkpoint is the run's last step: say so and train nothing (the caller returns, exit 0)."""
    state = ctx.state
    # Logged once, by the main process (the others log warnings only): the console and launch.log each show it.
    log.info(
        "the run is already complete: %s holds its final step %d of %d; nothing to train. To train again from "
        "scratch there: resume.from_checkpoint=never resume.overwrite=true; to train longer: raise train.n_epochs / "
        "train.max_steps with resume.allow_config_change=true.", resumed.path, state.global_step,
        ctx.plan.total_steps,
    )
    return state.last_val_loss if state.last_val_loss is not None else state.last_loss
