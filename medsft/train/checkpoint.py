"""Checkpoints: Hugging Face export + full training state, written atomically, rotated safely.

Layout of `{root}/checkpoint-{epoch}-{step}/`:
    config.json, model.safetensors, generation_config.json, tokenizer files   (from_pretrained(dir) works)
    training_state/        accelerate's save_state: model, optimizer, LR scheduler, grad scaler, RNG states of
                           every process (python, numpy, torch, cuda), DeepSpeed shards under ZeRO,
                           torch.distributed.checkpoint shards of model and optimizer under FSDP2
    trainer_state.json     position in the data (epoch, optimizer steps done in it), step and skip counters,
                           the metric window not yet logged, wandb run id, config fingerprint
    medsft_config.yaml     the resolved config of the run (no secrets)
    MANIFEST.json          every file's size and checksum, verified before the checkpoint is used (integrity.py)
    COMPLETE               written last; a folder without it is never resumed from or counted as kept
An adapter run (peft.enabled) writes the adapter in peft's format instead of the model (medsft.train.adapter_checkpoint).

Crash safety (a process may be SIGKILLed at any instruction):
- Everything is written into `.tmp-checkpoint-*` first and fsynced; the COMPLETE marker is written and fsynced
  last, then the folder is renamed to its final name (atomic) and the parent directory fsynced. A save killed
  half-way leaves only a `.tmp-` folder, which resume ignores and the next save removes.
- Rotation runs only after the new checkpoint is complete, never deletes the newest complete checkpoint, and
  renames a folder to `.deleting-*` before removing its files, so a kill during deletion never leaves a
  half-deleted folder under a checkpoint name.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf

from medsft.errors import OutputError
from medsft.runtime.accelerator import full_state_dict
from medsft.testing import faults  # TEST-ONLY hooks, inert unless $MEDSFT_TEST_FAULTS is set
from medsft.train import adapter_checkpoint as adapters
from medsft.train import integrity

log = logging.getLogger("medsft.checkpoint")

COMPLETE_MARKER = "COMPLETE"
STATE_FILE = "trainer_state.json"
TRAINING_STATE_DIR = "training_state"
CONFIG_FILE = "medsft_config.yaml"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".deleting-"
_NAME = re.compile(r"^checkpoint-(\d+)-(\d+)$")


def checkpoint_name(epoch: int, step: int) -> str:
    return f"checkpoint-{epoch}-{step}"


def checkpoint_step(path: Path) -> Optional[int]:
    """Global step in a checkpoint folder's name, or None when it is not one."""
    match = _NAME.match(Path(path).name)
    return int(match.group(2)) if match else None


def list_complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under root, oldest first (ordered by global step)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _NAME.match(child.name)
        if match and (child / COMPLETE_MARKER).is_file():
            found.append((int(match.group(2)), int(match.group(1)), child))
    return [path for _, _, path in sorted(found)]


def latest_complete_checkpoint(root: Path) -> Optional[Path]:
    complete = list_complete_checkpoints(root)
    return complete[-1] if complete else None


def _fsync_tree(path: Path) -> None:
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _delete(path: Path) -> None:
    """Rename to `.deleting-*` (atomic: the name stops counting at once), then remove the files."""
    trash = path.parent / f"{TRASH_PREFIX}{path.name}"
    if trash.exists():
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def save_checkpoint(
    accelerator,
    model,
    tokenizer,
    root: Path,
    epoch: int,
    step: int,
    trainer_state: dict,
    cfg,
) -> Path:
    """Collective: every process must call it. Returns the final checkpoint path.

    Refused before anything is written when the weights are not finite (TrainingDiverged) or the disk lacks
    room (OutputError); a write that fails removes the partial temporary folder (medsft.train.integrity).
    """
    started = time.perf_counter()
    root = Path(root)
    final = root / checkpoint_name(epoch, step)
    tmp = root / f"{TMP_PREFIX}{checkpoint_name(epoch, step)}"
    latest = latest_complete_checkpoint(root)

    # The weights this checkpoint holds: the full (ZeRO-3, FSDP2: gathered) state dict, or an adapter run's trained
    # parameters (gathered under ZeRO-3; medsft.train.adapter_checkpoint). A collective: all processes take part.
    adapter_run = adapters.is_adapter_run(accelerator, model)
    state_dict = adapters.trained_state_dict(accelerator, model) if adapter_run else full_state_dict(accelerator, model)
    integrity.refuse_non_finite(accelerator, state_dict, step, root, latest, cfg.optimizer.learning_rate)
    need = integrity.estimate_bytes(accelerator, state_dict, optimizer_of(accelerator), latest)
    integrity.ensure_free_space(accelerator, root, need, latest)
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left by a save of this step that was killed
            shutil.rmtree(tmp)
        tmp.mkdir()
    accelerator.wait_for_everyone()

    failure: Optional[BaseException] = None
    try:
        if adapter_run:  # peft: the adapter only, in peft's format with its model card
            adapters.save_adapter(accelerator, model, tmp, state_dict)
        else:
            accelerator.unwrap_model(model).save_pretrained(
                tmp,
                is_main_process=accelerator.is_main_process,
                save_function=accelerator.save,
                state_dict=state_dict,
                safe_serialization=True,
            )
        del state_dict
        accelerator.save_state(str(tmp / TRAINING_STATE_DIR), **adapters.save_state_kwargs(accelerator, model))
        if accelerator.is_main_process:
            tokenizer.save_pretrained(tmp)
            (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2), encoding="utf-8")
            OmegaConf.save(cfg, tmp / CONFIG_FILE, resolve=True)
    except Exception as err:  # noqa: BLE001 - decided together below, so no process waits for a failed one
        failure = err
    _raise_if_failed(accelerator, failure, root, tmp, need, latest)
    accelerator.wait_for_everyone()
    faults.in_save(step)  # TEST-ONLY (MEDSFT_TEST_FAULTS=kill_in_save=N): every file written, no marker yet

    if accelerator.is_main_process:
        try:
            integrity.write_manifest(tmp)  # sizes and checksums, verified before a resume uses the checkpoint
            _fsync_tree(tmp)
            _write_synced(tmp / COMPLETE_MARKER, "ok\n")
            _fsync_dir(tmp)
        except Exception as err:  # noqa: BLE001
            failure = err
    _raise_if_failed(accelerator, failure, root, tmp, need, latest)
    if accelerator.is_main_process:
        trash = root / f"{TRASH_PREFIX}{final.name}"
        if final.exists():  # a re-save of the same step: the old copy is un-named only now the new one is complete
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(final, trash)
        os.replace(tmp, final)
        _fsync_dir(root)
        shutil.rmtree(trash, ignore_errors=True)
    accelerator.wait_for_everyone()
    log.info("checkpoint %s written in %.2f s", final.name, time.perf_counter() - started)
    return final


def optimizer_of(accelerator):
    """The (first) prepared optimizer, for sizing its state; None when there is none."""
    optimizers = getattr(accelerator, "_optimizers", None) or []
    return optimizers[0] if optimizers else None


def _raise_if_failed(accelerator, failure: Optional[BaseException], root: Path, tmp: Path, need: int,
                     latest: Optional[Path]) -> None:
    """Collective: when a write failed on any process, remove the partial folder and raise on every process
    (a full disk as OutputError naming the space needed and free)."""
    if not integrity.any_process(accelerator, failure is not None):
        return
    disk_full = failure is not None and integrity.is_disk_full(failure, root, need)
    disk_full = integrity.any_process(accelerator, disk_full)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    if disk_full:
        raise OutputError(integrity.no_space_message(root, need, latest, removed=tmp.name)) from failure
    if failure is not None:
        raise failure
    raise OutputError(f"writing the checkpoint {tmp.name} into {root} failed on another process (its message is "
                      "above); the partial folder was removed")


def rotate_checkpoints(root: Path, keep: int, protect: Optional[Path] = None) -> list[Path]:
    """Delete the oldest complete checkpoints beyond `keep`; never the newest, never `protect`.

    Call it only after the new checkpoint is complete, so a crash never leaves fewer than one good one.
    Leftovers of killed saves (`.tmp-*`) and of killed deletions (`.deleting-*`) are removed too.
    """
    root = Path(root)
    removed = []
    complete = list_complete_checkpoints(root)
    protected = Path(protect).resolve() if protect is not None else None
    for old in complete[: max(0, len(complete) - max(1, keep))]:
        if protected is not None and old.resolve() == protected:
            continue
        _delete(old)
        removed.append(old)
    remove_leftovers(root)
    return removed


def remove_leftovers(root: Path) -> list[Path]:
    """Remove `.tmp-checkpoint-*` (killed saves) and `.deleting-*` (killed deletions) under root."""
    root = Path(root)
    if not root.is_dir():
        return []
    stale = [p for p in root.iterdir() if p.name.startswith((f"{TMP_PREFIX}checkpoint-", TRASH_PREFIX))]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def remove_checkpoints(paths: list[Path]) -> None:
    """Delete whole checkpoints (resume.overwrite=true), each atomically un-named first."""
    for path in paths:
        if Path(path).exists():
            _delete(Path(path))


def read_trainer_state(checkpoint: Path) -> dict:
    return json.loads((Path(checkpoint) / STATE_FILE).read_text(encoding="utf-8"))
