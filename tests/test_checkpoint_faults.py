"""Checkpoints under faults: every checkpoint is verified (sizes and checksums recorded at write time, formats
checked) before a resume uses it and resume falls back to the newest intact one; a final checkpoint with
truncated weights is not "complete"; a full disk is said plainly, leaves no partial folder and keeps the
previous checkpoint; non-finite weights are never written."""

from __future__ import annotations

import errno
import logging
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from medsft.errors import OutputError, TrainingDiverged
from medsft.train import checkpoint as ckpt
from medsft.train import integrity
from train_utils import ROOT, compose_cfg, reset_accelerate, tiny_overrides, train_in_process


@pytest.fixture
def saver(tmp_path, tiny_model_cfg):
    """save(step) -> a real checkpoint of the tiny model under tmp_path/root; .model, .accelerator, .root."""
    from accelerate import Accelerator

    from medsft.models import load_model, load_tokenizer

    reset_accelerate()
    cfg = compose_cfg(tiny_overrides(tmp_path, f"model.cache_dir={tiny_model_cfg.cache_dir}"))
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, dtype=torch.float32)
    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    model(torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    optimizer.step()  # an optimizer state to save, as in training
    root = tmp_path / "root"

    def save(step: int, epoch: int = 0) -> Path:
        return ckpt.save_checkpoint(accelerator, model, tokenizer, root, epoch, step, {"global_step": step}, cfg)

    save.root, save.model, save.accelerator = root, model, accelerator
    yield save
    reset_accelerate()


def _problems(path: Path) -> list[str]:
    return integrity.checkpoint_problems(path, ckpt.STATE_FILE, ckpt.TRAINING_STATE_DIR)


def _truncate(path: Path, keep: float = 0.5) -> None:
    with path.open("r+b") as handle:
        handle.truncate(int(path.stat().st_size * keep))


def test_every_kind_of_damage_is_found_with_and_without_a_manifest(saver, tmp_path):
    good = saver(2)
    assert _problems(good) == []
    files = integrity.json.loads((good / integrity.MANIFEST_FILE).read_text())["files"]
    assert {"model.safetensors", "training_state/optimizer.bin", ckpt.STATE_FILE, "config.json"} <= set(files)
    assert all(entry["digest"].startswith("sha256:") for entry in files.values())

    def damaged(name: str, damage, manifest: bool = True) -> list[str]:
        copy = tmp_path / f"copy-{len(list(tmp_path.iterdir()))}"
        shutil.copytree(good, copy)
        if not manifest:
            (copy / integrity.MANIFEST_FILE).unlink()
        damage(copy / name)
        return _problems(copy)

    def flip_a_byte(path: Path) -> None:
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))

    for manifest in (True, False):  # checkpoints written before manifests existed are checked by format
        for name in ("model.safetensors", "training_state/model.safetensors", "training_state/optimizer.bin"):
            problems = damaged(name, _truncate, manifest)
            assert problems and any(Path(name).name in p and ("truncated" in p or "bytes" in p) for p in problems), \
                (name, manifest, problems)
        assert any(ckpt.STATE_FILE in p and "missing" in p for p in damaged(ckpt.STATE_FILE, Path.unlink, manifest))
    assert damaged("config.json", flip_a_byte) == ["config.json changed since it was written (checksum)"]


def test_resume_falls_back_to_the_newest_intact_checkpoint_and_a_damaged_final_is_not_complete(tmp_path, caplog):
    extra = ("checkpoint.every_n_steps=2", "train.max_steps=4", "checkpoint.max_ckpts=3", "logging.plot=false")
    train_in_process(tmp_path, *extra)
    final = ckpt.latest_complete_checkpoint(tmp_path / "ckpts" / "tiny")
    assert ckpt.checkpoint_step(final) == 4 and _problems(final) == []
    uninterrupted = (final / "model.safetensors").read_bytes()
    _truncate(final / "model.safetensors")  # the final checkpoint's HF weights cut short

    caplog.set_level(logging.WARNING, logger="medsft.resume")
    train_in_process(tmp_path, *extra, run_dir=tmp_path / "run2")
    assert "is damaged (model.safetensors" in caplog.text and "resuming from checkpoint-0-2" in caplog.text
    root = tmp_path / "ckpts" / "tiny"
    assert (root / f"{final.name}{integrity.DAMAGED_SUFFIX}").is_dir()  # set aside, never counted again
    redone = ckpt.latest_complete_checkpoint(root)
    assert redone.name == final.name and _problems(redone) == []
    assert (redone / "model.safetensors").read_bytes() == uninterrupted  # the resumed run ends bitwise the same

    # Nothing intact left: a clear refusal naming each checkpoint and the way out.
    (redone / ckpt.STATE_FILE).unlink()
    _truncate(root / "checkpoint-0-2" / ckpt.TRAINING_STATE_DIR / "optimizer.bin")
    with pytest.raises(OutputError) as refused:
        train_in_process(tmp_path, *extra, run_dir=tmp_path / "run3")
    message = str(refused.value)
    assert "no intact checkpoint" in message and "trainer_state.json is missing" in message
    assert "optimizer.bin" in message and "resume.from_checkpoint=never resume.overwrite=true" in message


def test_non_finite_weights_are_never_written(saver):
    first = saver(2)
    with torch.no_grad():
        next(saver.model.parameters()).view(-1)[0] = float("inf")
    with pytest.raises(TrainingDiverged) as refused:
        saver(4)
    assert "not finite" in str(refused.value) and "checkpoint-0-2" in str(refused.value)
    assert sorted(p.name for p in saver.root.iterdir()) == [first.name]  # no temporary folder, no new checkpoint


def test_too_little_free_space_is_refused_before_writing(saver, monkeypatch):
    first = saver(2)
    size = integrity.folder_bytes(first)
    monkeypatch.setattr(integrity, "free_bytes", lambda path: size // 2)
    with pytest.raises(OutputError) as refused:
        saver(4)
    message = str(refused.value)
    assert f"no space left on {saver.root}: need ~" in message and "MB free" in message
    assert "checkpoint-0-2 is kept" in message
    assert sorted(p.name for p in saver.root.iterdir()) == [first.name]


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"),
                                     RuntimeError("basic_ios::clear: iostream error")])
def test_a_disk_that_fills_during_the_write_leaves_no_partial_folder(saver, monkeypatch, failure):
    first = saver(2)

    def fill_then_fail(path):
        Path(path).mkdir(parents=True)
        (Path(path) / "optimizer.bin").write_bytes(b"partial")
        raise failure

    monkeypatch.setattr(saver.accelerator, "save_state", fill_then_fail)
    if isinstance(failure, RuntimeError):  # torch says nothing about the cause: the free space left tells
        monkeypatch.setattr(integrity, "ensure_free_space", lambda *args: None)  # (it passed; then the disk filled)
        monkeypatch.setattr(integrity, "free_bytes", lambda path: 1024)
    with pytest.raises(OutputError, match=r"no space left on .*partial checkpoint .tmp-checkpoint-0-4 was removed"):
        saver(4)
    assert sorted(p.name for p in saver.root.iterdir()) == [first.name] and _problems(first) == []


def _can_mount_tmpfs() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs user namespaces (unshare -rm) to mount a small tmpfs")
def test_a_really_full_disk(tiny_model_cfg, tmp_path):
    """On a real 32 MB file system: the first checkpoint fits, then the disk is filled to ~1 MB free; the second
    runs out of space mid-write (the free space check is told there is room), then the check itself refuses;
    the first checkpoint survives intact."""
    disk = tmp_path / "disk"
    disk.mkdir()
    script = textwrap.dedent(f"""
        import torch
        from accelerate import Accelerator
        from medsft.config import compose
        from medsft.errors import OutputError
        from medsft.models import load_model, load_tokenizer
        from medsft.train import checkpoint as ckpt, integrity

        cfg = compose(["model=tiny_random", "model.cache_dir={tiny_model_cfg.cache_dir}"])
        tokenizer, model = load_tokenizer(cfg.model), load_model(cfg.model, dtype=torch.float32)
        acc = Accelerator(cpu=True)
        model, opt = acc.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
        model(torch.tensor([[1, 2]]), labels=torch.tensor([[1, 2]])).loss.backward(); opt.step()
        root = "{disk}/exp"
        save = lambda step: ckpt.save_checkpoint(acc, model, tokenizer, root, 0, step, {{"global_step": step}}, cfg)
        first = save(1)
        import shutil
        with open("{disk}/filler", "wb") as handle:  # leave ~1 MB: less than a checkpoint
            handle.write(b"x" * (shutil.disk_usage("{disk}").free - 2**20))
        real_check = integrity.ensure_free_space
        integrity.ensure_free_space = lambda *args: None
        try:
            save(2)
        except OutputError as err:
            print("MIDWRITE", err)
        integrity.ensure_free_space = real_check
        try:
            save(3)
        except OutputError as err:
            print("PRECHECK", err)
        import os
        print("LEFT", sorted(os.listdir(root)))
        print("INTACT", integrity.checkpoint_problems(first, ckpt.STATE_FILE, ckpt.TRAINING_STATE_DIR))
    """)
    done = subprocess.run(
        ["unshare", "-rm", "sh", "-c", f'mount -t tmpfs -o size=32m tmpfs "{disk}" && exec "$0" -c "$1"',
         sys.executable, script],
        capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    out = done.stdout
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"MIDWRITE no space left on {disk}/exp: need ~" in out and ".tmp-checkpoint-0-2 was removed" in out, out
    assert f"PRECHECK no space left on {disk}/exp: need ~" in out and "nothing was written" in out, out
    assert "LEFT ['checkpoint-0-1']" in out and "INTACT []" in out, out
