"""Checkpoints: Hugging Face export + full training state, written atomically, rotated safely.

Layout of `{root}/checkpoint-{epoch}-{step}/`:
    config.json, model.safetensors, generation_config.json, tokenizer files   (from_pretrained(dir) works)
    training_state/        accelerate's save_state (optimizer, scheduler, RNG per process, DeepSpeed shards)
    trainer_state.json     position in the data, step counters, wandb run id, config fingerprint
    medsft_config.yaml     the resolved config of the run (no secrets)
    COMPLETE               written last; a folder without it is never resumed from or counted as kept

Everything is written into `.tmp-checkpoint-*` first, fsynced, then renamed: a process killed while saving
leaves only a temp folder, which the next save or resume ignores and removes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf

COMPLETE_MARKER = "COMPLETE"
STATE_FILE = "trainer_state.json"
TRAINING_STATE_DIR = "training_state"
CONFIG_FILE = "medsft_config.yaml"
_NAME = re.compile(r"^checkpoint-(\d+)-(\d+)$")


def checkpoint_name(epoch: int, step: int) -> str:
    return f"checkpoint-{epoch}-{step}"


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
    """Collective: every process must call it. Returns the final checkpoint path."""
    root = Path(root)
    final = root / checkpoint_name(epoch, step)
    tmp = root / f".tmp-{checkpoint_name(epoch, step)}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    accelerator.wait_for_everyone()

    # The full (ZeRO-3: gathered) state dict; a collective, so all processes take part.
    state_dict = accelerator.get_state_dict(model)
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.save_pretrained(
        tmp,
        is_main_process=accelerator.is_main_process,
        save_function=accelerator.save,
        state_dict=state_dict,
        safe_serialization=True,
    )
    accelerator.save_state(str(tmp / TRAINING_STATE_DIR))
    if accelerator.is_main_process:
        tokenizer.save_pretrained(tmp)
        (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2), encoding="utf-8")
        OmegaConf.save(cfg, tmp / CONFIG_FILE, resolve=True)
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        _fsync_tree(tmp)
        (tmp / COMPLETE_MARKER).write_text("ok\n", encoding="utf-8")
        _fsync_dir(tmp)
        if final.exists():  # a re-save of the same step (e.g. after resume at an epoch end)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    accelerator.wait_for_everyone()
    return final


def rotate_checkpoints(root: Path, keep: int, protect: Optional[Path] = None) -> list[Path]:
    """Delete the oldest complete checkpoints beyond `keep`; never the newest, never `protect`.

    Called only after the new checkpoint is complete, so a crash never leaves fewer than one good one.
    Leftover temp folders from killed saves are removed too.
    """
    root = Path(root)
    removed = []
    complete = list_complete_checkpoints(root)
    for old in complete[: max(0, len(complete) - max(1, keep))]:
        if protect is not None and old.resolve() == Path(protect).resolve():
            continue
        shutil.rmtree(old, ignore_errors=True)
        removed.append(old)
    if root.is_dir():
        for stale in root.glob(".tmp-checkpoint-*"):
            shutil.rmtree(stale, ignore_errors=True)
    return removed


def read_trainer_state(checkpoint: Path) -> dict:
    return json.loads((Path(checkpoint) / STATE_FILE).read_text(encoding="utf-8"))
