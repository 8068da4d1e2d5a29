"""Crash safety of checkpoint writing and rotation, and the resume policy, without training (fast).

Kills are simulated by raising at the exact points where a SIGKILL would stop the process (the real SIGKILL
path on the real loop is tests/test_resume.py); what is left on disk is what a killed process leaves.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from medsft.errors import ConfigError
from medsft.train import checkpoint as ckpt
from medsft.testing import faults
from medsft.train import resume
from train_utils import compose_cfg, reset_accelerate, tiny_overrides


class Killed(BaseException):
    """Stands for SIGKILL: nothing after the raising point runs (BaseException: no `except Exception` sees it)."""


@pytest.fixture
def saver(tmp_path):
    """save(step, epoch=0) -> a real checkpoint of the tiny model under tmp_path/root (one Accelerator)."""
    from accelerate import Accelerator

    from medsft.models import load_model, load_tokenizer

    reset_accelerate()
    cfg = compose_cfg(tiny_overrides(tmp_path))
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, dtype=torch.float32)
    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    root = tmp_path / "root"

    def save(step: int, epoch: int = 0) -> Path:
        return ckpt.save_checkpoint(accelerator, model, tokenizer, root, epoch, step, {"global_step": step}, cfg)

    save.root = root
    yield save
    reset_accelerate()


def _names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def test_kill_at_any_point_of_a_save_or_rotation_never_loses_the_newest_complete_checkpoint(saver, monkeypatch):
    root = saver.root
    first = saver(2)
    assert ckpt.latest_complete_checkpoint(root) == first

    # 1. Killed with every file written but no COMPLETE marker (where MEDSFT_TEST_FAULTS=kill_in_save stops).
    monkeypatch.setattr(faults, "in_save", lambda step: (_ for _ in ()).throw(Killed()))
    with pytest.raises(Killed):
        saver(4)
    monkeypatch.undo()
    tmp4 = root / ".tmp-checkpoint-0-4"
    assert (tmp4 / "model.safetensors").is_file() and not (tmp4 / ckpt.COMPLETE_MARKER).exists()
    assert ckpt.list_complete_checkpoints(root) == [first]

    # 2. Killed after the marker, before the rename: the marked temp folder still never counts.
    real_replace = os.replace

    def replace_then_die(src, dst):
        if Path(src).name.startswith(ckpt.TMP_PREFIX):
            raise Killed()
        real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", replace_then_die)
    with pytest.raises(Killed):
        saver(4)
    monkeypatch.undo()
    assert (tmp4 / ckpt.COMPLETE_MARKER).is_file()
    assert ckpt.list_complete_checkpoints(root) == [first]

    # 3. The next save of that step replaces the stale temp folder; rotation (keep 1) runs only now.
    second = saver(4)
    assert ckpt.list_complete_checkpoints(root) == [first, second]
    removed = ckpt.rotate_checkpoints(root, keep=1, protect=second)
    assert removed == [first] and _names(root) == ["checkpoint-0-4"]

    # 4. Killed in the middle of deleting an old checkpoint: it was renamed first, so it no longer counts.
    third = saver(6)
    real_rmtree = ckpt.shutil.rmtree

    def rmtree_dies_on_rotation(path, *args, **kwargs):
        if Path(path).name.startswith(ckpt.TRASH_PREFIX) and Path(path).exists():
            (Path(path) / ckpt.COMPLETE_MARKER).unlink(missing_ok=True)  # "half deleted"
            raise Killed()
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(ckpt.shutil, "rmtree", rmtree_dies_on_rotation)
    with pytest.raises(Killed):
        ckpt.rotate_checkpoints(root, keep=1, protect=third)
    monkeypatch.undo()
    assert ckpt.list_complete_checkpoints(root) == [third]
    assert ".deleting-checkpoint-0-4" in _names(root)
    # Leftovers of killed saves and deletions go at the next rotation; the newest is never deleted.
    (root / ".tmp-checkpoint-0-8").mkdir()
    assert ckpt.rotate_checkpoints(root, keep=1, protect=third) == []
    assert _names(root) == ["checkpoint-0-6"]


def test_re_saving_a_step_keeps_the_old_copy_until_the_new_one_is_complete(saver, monkeypatch):
    root = saver.root
    saver(3)
    monkeypatch.setattr(faults, "in_save", lambda step: (_ for _ in ()).throw(Killed()))
    with pytest.raises(Killed):
        saver(3)
    monkeypatch.undo()
    assert [p.name for p in ckpt.list_complete_checkpoints(root)] == ["checkpoint-0-3"]
    saver(3)
    assert _names(root) == ["checkpoint-0-3"]
    assert (root / "checkpoint-0-3" / ckpt.COMPLETE_MARKER).is_file()


def test_rotation_never_deletes_the_newest_even_with_keep_below_one(tmp_path):
    root = tmp_path / "root"
    for step in (1, 5, 10):
        _fake_checkpoint(root, step)
    ckpt.rotate_checkpoints(root, keep=0)
    assert [p.name for p in ckpt.list_complete_checkpoints(root)] == ["checkpoint-0-10"]


# ----------------------------------------------------------------------------------------------- resume policy


def _fake_checkpoint(root: Path, step: int, epoch: int = 0) -> Path:
    """A structurally intact checkpoint without a model behind it: state, weights and training state files."""
    from safetensors.torch import save_file

    path = root / ckpt.checkpoint_name(epoch, step)
    (path / ckpt.TRAINING_STATE_DIR).mkdir(parents=True)
    (path / ckpt.STATE_FILE).write_text(json.dumps({"global_step": step}), encoding="utf-8")
    save_file({"w": torch.zeros(2)}, str(path / "model.safetensors"))
    torch.save({"step": step}, path / ckpt.TRAINING_STATE_DIR / "optimizer.bin")
    (path / ckpt.COMPLETE_MARKER).write_text("ok\n", encoding="utf-8")
    return path


def _resume_cfg(choice="auto", overwrite=False, allow=False):
    return SimpleNamespace(from_checkpoint=choice, overwrite=overwrite, allow_config_change=allow)


def _fake_ctx(root: Path, resume_cfg):
    accelerator = SimpleNamespace(is_main_process=True, num_processes=1, wait_for_everyone=lambda: None)
    return SimpleNamespace(cfg=SimpleNamespace(resume=resume_cfg), ckpt_root=root, accelerator=accelerator)


def test_resume_choice_auto_never_overwrite_and_explicit_paths(tmp_path):
    root = tmp_path / "root"
    assert resume.find_resume_checkpoint(_resume_cfg("auto"), root) is None  # nothing yet: fresh start
    assert resume.find_resume_checkpoint(_resume_cfg("never"), root) is None
    old, new = _fake_checkpoint(root, 4), _fake_checkpoint(root, 8, epoch=1)
    (root / ".tmp-checkpoint-1-10").mkdir()  # a killed save is never picked
    (root / "checkpoint-1-12").mkdir()  # neither is a folder without COMPLETE
    for choice in ("auto", "true", True):
        assert resume.find_resume_checkpoint(_resume_cfg(choice), root) == new

    # never: refuses a folder that already holds checkpoints, names them and the way out.
    for choice in ("never", False, None):
        with pytest.raises(ConfigError) as err:
            resume.find_resume_checkpoint(_resume_cfg(choice), root)
        assert "resume.overwrite=true" in str(err.value) and "checkpoint-1-8" in str(err.value)
    # ... unless resume.overwrite=true, which deletes them (else rotation would keep the old run's
    # higher-step checkpoints and a later resume=auto would pick them).
    assert resume.maybe_resume(_fake_ctx(root, _resume_cfg("never", overwrite=True))) is None
    assert ckpt.list_complete_checkpoints(root) == []

    # An explicit path: must be complete; refused while newer checkpoints of the folder exist.
    old, new = _fake_checkpoint(root, 4), _fake_checkpoint(root, 8, epoch=1)
    with pytest.raises(ConfigError, match="not a complete medsft checkpoint"):
        resume.find_resume_checkpoint(_resume_cfg(str(root / "checkpoint-1-12")), root)
    assert resume.find_resume_checkpoint(_resume_cfg(str(new)), root) == new.resolve()
    with pytest.raises(ConfigError, match="older than 1 checkpoint.*checkpoint-1-8"):
        resume.find_resume_checkpoint(_resume_cfg(str(old)), root)
    assert resume.find_resume_checkpoint(_resume_cfg(str(old), overwrite=True), root) == old.resolve()
    assert resume._to_delete(_resume_cfg(str(old), overwrite=True), root, old.resolve()) == [new]


def test_config_differences_name_the_keys_that_change_the_computation(compose_config, tmp_path):
    saved = compose_config(*tiny_overrides(tmp_path))
    path = tmp_path / "ck"
    path.mkdir()
    from omegaconf import OmegaConf

    OmegaConf.save(saved, path / ckpt.CONFIG_FILE, resolve=True)
    fingerprint = {"data_hash": "aaa", "train_bsz_per_gpu": 4, "world_size": 1}
    # Where things go, how they are logged/checkpointed and the data file's path do not matter.
    same = compose_config(*tiny_overrides(tmp_path / "elsewhere", "checkpoint.every_n_steps=7", "logging.every_n_steps=5",
                                      "resume.allow_config_change=true", "train.max_consecutive_skips=3"))
    assert resume.exactness_differences(path, {"fingerprint": fingerprint}, fingerprint, same) == []
    changed = compose_config(*tiny_overrides(tmp_path, "train.train_bsz_per_gpu=2", "optimizer.learning_rate=1e-3"))
    diffs = resume.exactness_differences(path, {"fingerprint": fingerprint},
                                         {**fingerprint, "data_hash": "bbb", "train_bsz_per_gpu": 2}, changed)
    keys = [d.split(":")[0] for d in diffs]
    assert keys == ["data_hash", "optimizer.learning_rate", "train.train_bsz_per_gpu"], diffs


# ----------------------------------------------------------------------------------------------- signals, faults


def test_sigterm_handler_sets_a_flag_and_is_removed_after_the_run():
    from medsft.train.signals import PREEMPTED_EXIT_CODE, PreemptionHandler, TrainingPreempted

    before = signal.getsignal(signal.SIGTERM)
    handler = PreemptionHandler().install()
    one_process = SimpleNamespace(num_processes=1)
    try:
        assert not handler.stop_requested(one_process)
        os.kill(os.getpid(), signal.SIGTERM)  # the process survives: the handler only records it
        assert handler.stop_requested(one_process)
    finally:
        handler.uninstall()
    assert signal.getsignal(signal.SIGTERM) is before
    err = handler.preempted(7, "/x/checkpoint-1-7")
    assert isinstance(err, TrainingPreempted) and err.exit_code == PREEMPTED_EXIT_CODE == 75
    assert "SIGTERM" in str(err) and "checkpoint-1-7" in str(err)


def test_fault_injection_is_inert_without_the_variable_and_rejects_typos(monkeypatch):
    monkeypatch.delenv(faults.ENV, raising=False)
    loss = torch.tensor(2.0)
    assert faults.on_micro_batch(loss, 3, True) is loss
    monkeypatch.setenv(faults.ENV, "nan_at_steps=3,4")
    assert torch.isnan(faults.on_micro_batch(loss, 3, False)) and faults.on_micro_batch(loss, 5, True) is loss
    monkeypatch.setenv(faults.ENV, "kil_in_save=3")
    with pytest.raises(ValueError, match="unknown fault"):
        faults.in_save(3)
