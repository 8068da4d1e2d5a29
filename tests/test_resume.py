"""Exact resume on the real loop (tiny-random with attention dropout, so RNG restore matters): SIGKILL
mid-step, during a checkpoint write and at a random moment, SIGTERM, NaN steps, config changes, a finished
run. Every interrupted+resumed run must log the same per-step losses and end with the same weights as one
uninterrupted run: bitwise on one process, within 1e-6 relative on two (gloo).

Runs are kept few and small (12 optimizer steps over 2 epochs with accumulation 2, rows cut at 256 tokens);
kills that must be real SIGKILLs run `launch.py` as a subprocess, everything else runs in this process.
Faults land at known points through the TEST-ONLY hooks of medsft/train/faults.py (MEDSFT_TEST_FAULTS).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medsft.errors import ConfigError
from medsft.train import checkpoint as ckpt
from medsft.testing.faults import ENV as FAULTS
from train_utils import ROOT, compose_cfg, reset_accelerate, tiny_overrides

TOTAL_STEPS = 12  # 42 train examples, 4 per micro-batch -> 11 micro-batches = 6 steps per epoch (last one short)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One torch thread here and in the subprocesses (OMP_NUM_THREADS=1; a 2-process launch gets one per process
    anyway): on a 2-core machine shared with other jobs, OpenMP threads spinning on oversubscribed cores made
    these runs ~10x slower. Exactness does not depend on it: the same tests also passed bitwise with 2 threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def dropout_model(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny random Llama with attention_dropout=0.1: training consumes the torch RNG at every step."""
    path = tmp_path_factory.mktemp("models") / "tiny-dropout"
    shutil.copytree(tiny_model_dir, path)
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    config["attention_dropout"] = 0.1
    (path / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return path


def _overrides(tmp: Path, model: Path, *extra: str, logging: str = "none") -> list[str]:
    base = [o for o in tiny_overrides(tmp) if not o.startswith("logging=")]
    return [*base, f"logging={logging}", "logging.progress_bar=false", "logging.plot=false", f"model.path={model}",
            "data.max_seq_len=256", "data.overlong=truncate", "train.gradient_accumulation_steps=2",
            "train.n_epochs=2", "checkpoint.every_n_steps=2", "checkpoint.max_ckpts=1", *extra]


def _train(tmp: Path, model: Path, run: str, *extra: str, logging: str = "none"):
    """One run in this process (no import cost), checkpoints in tmp/ckpts/tiny, metrics in tmp/<run>."""
    from medsft.run import run as run_stage

    reset_accelerate()
    run_dir = tmp / run
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        return run_stage(compose_cfg(_overrides(tmp, model, *extra, logging=logging)), run_dir)
    finally:
        reset_accelerate()


def _launch_cmd(tmp: Path, model: Path, run: str, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "launch.py"), *_overrides(tmp, model, *extra), f"hydra.run.dir={tmp / run}"]


def _env(faults: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != FAULTS}
    env["OMP_NUM_THREADS"] = "1"
    if faults:
        env[FAULTS] = faults
    return env


def _records(run_dir: Path, kind: str = "train") -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:  # a SIGKILLed writer may leave a partial last line
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("kind") == kind:
            out.append(record)
    return out


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _records(run_dir)}


def _weights(root: Path) -> dict[str, torch.Tensor]:
    latest = ckpt.latest_complete_checkpoint(root)
    assert latest is not None and ckpt.read_trainer_state(latest)["global_step"] == TOTAL_STEPS, latest
    return load_file(latest / "model.safetensors")


def _assert_same_weights(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    different = [k for k in expected if not torch.equal(got[k], expected[k])]
    assert not different, f"weights differ bitwise in {different}"


def _steps_of(path: Path) -> int:
    return ckpt.read_trainer_state(path)["global_step"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, dropout_model):
    """The uninterrupted run every interrupted one is compared with (one process, in this process)."""
    tmp = tmp_path_factory.mktemp("reference")
    _train(tmp, dropout_model, "run")
    losses = _losses(tmp / "run")
    assert sorted(losses) == list(range(1, TOTAL_STEPS + 1))
    root = tmp / "ckpts" / "tiny"
    return {"tmp": tmp, "root": root, "losses": losses, "records": _records(tmp / "run"), "weights": _weights(root)}


def _assert_losses_match(reference: dict, runs: list[Path]) -> dict[int, float]:
    """Every step any run logged has the reference's loss, bitwise; together they cover every step."""
    seen: dict[int, float] = {}
    for run_dir in runs:
        for step, loss in _losses(run_dir).items():
            assert loss == reference["losses"][step], (run_dir.name, step, loss, reference["losses"][step])
            seen[step] = loss
    assert sorted(seen) == list(range(1, TOTAL_STEPS + 1))
    return seen


def test_sigkill_mid_step_during_a_checkpoint_write_and_at_random_then_resume_is_bitwise_exact(
        tmp_path, dropout_model, reference):
    root = tmp_path / "ckpts" / "tiny"
    kill = -signal.SIGKILL

    # A: killed inside step 5 (after the first micro-batch's backward). Checkpoints every 2 steps, 1 kept.
    a = subprocess.run(_launch_cmd(tmp_path, dropout_model, "a"), env=_env("kill_mid_step=5"), cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert a.returncode == kill, a.stderr[-3000:]
    assert [p.name for p in ckpt.list_complete_checkpoints(root)] == ["checkpoint-0-4"]
    assert max(_losses(tmp_path / "a")) == 4

    # B: resumes at 4 (replays step 5), killed while writing the checkpoint of step 8: every file is in the
    # temp folder but the marker is not. The only kept checkpoint (6) was not rotated away before 8 was done.
    b = subprocess.run(_launch_cmd(tmp_path, dropout_model, "b"), env=_env("kill_in_save=8"), cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert b.returncode == kill, b.stderr[-3000:]
    assert min(_losses(tmp_path / "b")) == 5
    assert [p.name for p in ckpt.list_complete_checkpoints(root)] == ["checkpoint-0-6"]
    partial = root / ".tmp-checkpoint-1-8"
    assert (partial / "model.safetensors").is_file() and (partial / ckpt.STATE_FILE).is_file()
    assert not (partial / ckpt.COMPLETE_MARKER).exists()

    # C: resumes at 6; SIGKILLed from outside at a random moment once the log reaches a random step.
    kill_after = random.Random().choice([8, 9, 10])
    c = subprocess.Popen(_launch_cmd(tmp_path, dropout_model, "c"), env=_env(), cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while c.poll() is None and time.time() < deadline:
        if max(_losses(tmp_path / "c"), default=0) >= kill_after:
            time.sleep(random.Random().uniform(0.0, 0.3))
            c.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    c.wait(timeout=60)
    resumed_at = _steps_of(ckpt.latest_complete_checkpoint(root))
    where = f"killed after step {kill_after} was logged; newest complete checkpoint then: step {resumed_at}"
    print(f"random SIGKILL: {where}")

    # D: resumes from whatever C left (stale temp folders are ignored) and finishes, here in-process.
    _train(tmp_path, dropout_model, "d")
    d_steps = sorted(_losses(tmp_path / "d"))
    if resumed_at < TOTAL_STEPS:  # no step skipped or repeated after the resume point
        assert d_steps == list(range(resumed_at + 1, TOTAL_STEPS + 1)), where
    _assert_losses_match(reference, [tmp_path / r for r in "abcd"])
    _assert_same_weights(_weights(root), reference["weights"])
    final = ckpt.read_trainer_state(ckpt.latest_complete_checkpoint(root))
    ref_final = ckpt.read_trainer_state(ckpt.latest_complete_checkpoint(reference["root"]))
    for key in ("global_step", "epoch", "step_in_epoch", "samples_seen", "skipped_steps", "last_loss"):
        assert final[key] == ref_final[key], (key, where)
    assert not list(root.glob(".tmp-*")) and not list(root.glob(".deleting-*"))


def test_sigterm_checkpoints_at_the_next_step_exits_75_and_resumes_exactly_with_the_same_wandb_run(
        tmp_path, dropout_model, reference, monkeypatch):
    from medsft.train.signals import PREEMPTED_EXIT_CODE, TrainingPreempted

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    # Log every 3 steps: the checkpoint of step 7 holds a window with step 7 not logged yet.
    extra = ("logging.every_n_steps=3", "logging.wandb_mode=offline")
    monkeypatch.setenv(FAULTS, "sigterm_after_step=7")
    handler_before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingPreempted) as err:
        _train(tmp_path, dropout_model, "first", *extra, logging="wandb_offline")
    assert err.value.exit_code == PREEMPTED_EXIT_CODE == 75
    assert signal.getsignal(signal.SIGTERM) is handler_before  # the run's handler is gone with the run
    root = tmp_path / "ckpts" / "tiny"
    latest = ckpt.latest_complete_checkpoint(root)
    assert latest.name == "checkpoint-1-7" and str(latest) in str(err.value)
    state = ckpt.read_trainer_state(latest)
    assert state["metric_window"]["steps"] == 1 and state["wandb_run_id"]
    assert [r["step"] for r in _records(tmp_path / "first")] == [3, 6]

    monkeypatch.delenv(FAULTS)
    _train(tmp_path, dropout_model, "second", *extra, logging="wandb_offline")
    second = _records(tmp_path / "second")
    assert [r["step"] for r in second] == [9, 12]
    # The window logged at 9 holds steps 7, 8, 9: 7 from the checkpoint, 8 and 9 from this run.
    ref = {r["step"]: r for r in reference["records"]}
    for record in second:
        steps = range(record["step"] - 2, record["step"] + 1)
        tokens = sum(ref[s]["loss_tokens"] for s in steps)
        assert record["loss_tokens"] == tokens and record["samples"] == sum(ref[s]["samples"] for s in steps)
        expected = sum(ref[s]["loss"] * ref[s]["loss_tokens"] for s in steps) / tokens
        assert record["loss"] == pytest.approx(expected, rel=1e-12)
    _assert_same_weights(_weights(root), reference["weights"])

    # The resumed run continued the same wandb run: two offline run folders, one id.
    runs = sorted((tmp_path / "logs" / "tiny" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and {r.name.rsplit("-", 1)[1] for r in runs} == {state["wandb_run_id"]}


def test_nan_steps_are_skipped_and_counted_then_the_run_stops_with_the_last_good_checkpoint(
        tmp_path, dropout_model, monkeypatch):
    from medsft.errors import TrainingDiverged

    monkeypatch.setenv(FAULTS, "nan_at_steps=3,5,6")
    with pytest.raises(TrainingDiverged) as err:
        _train(tmp_path, dropout_model, "run", "train.max_consecutive_skips=2")
    assert err.value.exit_code == 5
    assert "2 consecutive optimizer steps had a non-finite loss" in str(err.value)
    assert "train.max_consecutive_skips=2" in str(err.value)
    records = {r["step"]: r for r in _records(tmp_path / "run")}
    assert sorted(records) == [1, 2, 3, 4, 5]  # stopped at step 6, the second skip in a row
    assert [records[s]["skipped_in_window"] for s in (1, 2, 3, 4, 5)] == [0, 0, 1, 0, 1]
    assert [records[s]["skipped_total"] for s in (1, 2, 3, 4, 5)] == [0, 0, 1, 1, 2]
    assert math.isnan(records[3]["loss"]) and math.isfinite(records[4]["loss"])
    root = tmp_path / "ckpts" / "tiny"
    assert [p.name for p in ckpt.list_complete_checkpoints(root)] == ["checkpoint-0-4"]
    assert not list(root.glob(".tmp-*"))
    state = ckpt.read_trainer_state(root / "checkpoint-0-4")
    assert state["skipped_steps"] == 1 and state["consecutive_skips"] == 0
    weights = load_file(root / "checkpoint-0-4" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_a_finished_run_is_reported_complete_and_not_trained_again(tmp_path, dropout_model, reference, capsys,
                                                                   caplog):
    root = tmp_path / "ckpts" / "tiny"
    shutil.copytree(reference["root"], root)
    before = {p.name: p.stat().st_mtime_ns for p in root.rglob("*")}
    with caplog.at_level(logging.INFO, logger="medsft.resume"):
        objective = _train(tmp_path, dropout_model, "again")
    said = [r.getMessage() for r in caplog.records if "already complete" in r.getMessage()]
    assert len(said) == 1, said  # said once: the log reaches the console and launch.log, no second print
    assert "checkpoint-1-12" in said[0] and "nothing to train" in said[0]
    assert "already complete" not in capsys.readouterr().out
    state = ckpt.read_trainer_state(root / "checkpoint-1-12")
    assert objective == (state["last_val_loss"] if state["last_val_loss"] is not None else state["last_loss"])
    assert _records(tmp_path / "again") == []
    assert {p.name: p.stat().st_mtime_ns for p in root.rglob("*")} == before


def test_a_changed_config_is_refused_naming_the_keys_unless_allowed(tmp_path, dropout_model, reference):
    root = tmp_path / "ckpts" / "tiny"
    shutil.copytree(reference["root"], root)
    data = json.loads((ROOT / "data" / "demo_data.json").read_text(encoding="utf-8"))
    data[0]["Respuesta"] += " (editado)"
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    changed = (f"data.path={edited}", "train.train_bsz_per_gpu=2", "train.max_steps=13")
    with pytest.raises(ConfigError) as err:
        _train(tmp_path, dropout_model, "refused", *changed)
    message = str(err.value)
    named = sorted(line.strip()[2:].split(":")[0] for line in message.splitlines() if line.startswith("  - "))
    assert named == ["data_hash", "train.max_steps", "train.train_bsz_per_gpu"], message
    assert "resume.allow_config_change=true" in message
    assert _records(tmp_path / "refused") == []

    _train(tmp_path, dropout_model, "allowed", *changed, "resume.allow_config_change=true")
    assert [r["step"] for r in _records(tmp_path / "allowed")] == [13]


@pytest.mark.distributed
def test_two_processes_sigkill_then_resume_matches_within_1e_6(tmp_path, dropout_model):
    """gloo, 2 processes through launch.py's relaunch; every rank kills itself inside step 5."""
    two = ("launcher.num_processes=2", "launcher.cpu=true", "train.train_bsz_per_gpu=2")
    ref_tmp, tmp = tmp_path / "ref", tmp_path / "killed"

    def launch(where: Path, run: str, faults: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(_launch_cmd(where, dropout_model, run, *two), env=_env(faults), cwd=ROOT,
                              capture_output=True, text=True, timeout=600)

    ref = launch(ref_tmp, "run")
    assert ref.returncode == 0, ref.stderr[-3000:]
    killed = launch(tmp, "a", "kill_mid_step=5")
    assert killed.returncode != 0
    assert [p.name for p in ckpt.list_complete_checkpoints(tmp / "ckpts" / "tiny")] == ["checkpoint-0-4"]
    resumed = launch(tmp, "b")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    expected = _losses(ref_tmp / "run")
    got = {**_losses(tmp / "a"), **_losses(tmp / "b")}
    assert sorted(got) == sorted(expected) == list(range(1, TOTAL_STEPS + 1))
    assert min(_losses(tmp / "b")) == 5
    for step, loss in got.items():
        assert loss == pytest.approx(expected[step], rel=1e-6, abs=0), step
    ref_w, got_w = _weights(ref_tmp / "ckpts" / "tiny"), _weights(tmp / "ckpts" / "tiny")
    worst = max(float(((got_w[k] - ref_w[k]).abs() / ref_w[k].abs().clamp_min(1e-12)).max()) for k in ref_w)
    max_abs = max(float((got_w[k] - ref_w[k]).abs().max()) for k in ref_w)
    print(f"2 processes: max abs weight difference {max_abs:.3g}, max relative {worst:.3g}")
    for key in ref_w:
        torch.testing.assert_close(got_w[key], ref_w[key], rtol=1e-6, atol=1e-7)
