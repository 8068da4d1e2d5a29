"""One run owns an experiment folder: an exclusive lock for the run's life (a second run fails at once, naming
the folder and the holder), a stale lock after kill -9 never blocks the next run, experiment_name stays inside
output_dir, and the README's example commands get folders of their own."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from medsft.config import validate
from medsft.errors import ConfigError, OutputError
from medsft.runtime.cluster import LAUNCH_DIR_ENV
from medsft.runtime.lock import LOCK_FILE, FolderLock, held_fds
from medsft.runtime.workspace import claim_outputs, holds_experiment_lock
from train_utils import launch, tiny_overrides

ROOT = Path(__file__).resolve().parents[1]


def test_a_second_holder_is_refused_naming_the_folder_and_the_first(tmp_path):
    folder = tmp_path / "ckpts" / "exp"
    with FolderLock(folder, what="experiment folder", run_dir=tmp_path / "run-a") as first:
        assert first.fd in held_fds()
        info = json.loads((folder / LOCK_FILE).read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        with pytest.raises(OutputError) as refused:
            FolderLock(folder, what="experiment folder").acquire()
        message = str(refused.value)
        assert str(folder) in message and f"pid {os.getpid()} on {socket.gethostname()}" in message
        assert "run-a" in message
    assert not (folder / LOCK_FILE).exists() and not folder.exists()  # released; the empty folder is gone
    with FolderLock(folder):  # free again
        pass


def test_a_lock_left_by_a_killed_run_does_not_block_the_next(tmp_path):
    folder = tmp_path / "exp"
    (folder / "checkpoint-0-1").mkdir(parents=True)
    code = textwrap.dedent(f"""
        import os, signal
        from medsft.runtime.lock import FolderLock
        FolderLock({str(folder)!r}).acquire()
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert done.returncode == -signal.SIGKILL
    assert json.loads((folder / LOCK_FILE).read_text())["pid"] != os.getpid()  # its lock file is still there
    with FolderLock(folder):
        assert json.loads((folder / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert (folder / "checkpoint-0-1").is_dir()  # a folder with a run's files in it is never removed


def test_exactly_one_process_of_a_run_holds_the_lock(compose_config):
    cfg = compose_config("~experiment")
    two_nodes = compose_config("~experiment", "launcher=multi_node")
    assert holds_experiment_lock(cfg, {})  # python launch.py
    assert not holds_experiment_lock(cfg, {LAUNCH_DIR_ENV: "/tmp/x", "RANK": "0"})  # re-invoked: the parent holds it
    assert holds_experiment_lock(cfg, {"RANK": "0", "WORLD_SIZE": "2"})  # the user's own torchrun: rank 0 only
    assert not holds_experiment_lock(cfg, {"RANK": "1", "WORLD_SIZE": "2"})
    assert holds_experiment_lock(two_nodes, {})  # machine 0 (launcher.machine_rank=0)
    assert not holds_experiment_lock(two_nodes, {"SLURM_NNODES": "2", "SLURM_NODEID": "1"})
    srun = {"SLURM_STEP_NUM_TASKS": "16", "SLURM_NNODES": "2"}
    assert holds_experiment_lock(two_nodes, {**srun, "SLURM_PROCID": "0", "SLURM_NODEID": "0"})
    assert not holds_experiment_lock(two_nodes, {**srun, "SLURM_PROCID": "9", "SLURM_NODEID": "1"})


def test_claim_outputs_locks_the_experiment_folder_for_the_block(compose_config, tmp_path):
    cfg = compose_config(*tiny_overrides(tmp_path))
    folder = tmp_path / "ckpts" / "tiny"
    with claim_outputs(cfg, tmp_path / "run"):
        assert (folder / LOCK_FILE).is_file()
        with pytest.raises(OutputError, match="experiment_name=... \\(now tiny\\)"):
            with claim_outputs(cfg, tmp_path / "run2"):
                pass
    assert not (folder / LOCK_FILE).exists()


@pytest.mark.slow
def test_a_second_run_on_a_busy_experiment_folder_fails_at_once(tmp_path):
    folder = tmp_path / "ckpts" / "tiny"
    with FolderLock(folder, what="experiment folder", run_dir=tmp_path / "first-run"):
        done = launch(*tiny_overrides(tmp_path), f"hydra.run.dir={tmp_path / 'run'}")
        assert sorted(p.name for p in folder.iterdir()) == [LOCK_FILE]  # nothing of the second run's in it
    out = done.stdout + done.stderr
    assert done.returncode == OutputError.exit_code, out[-3000:]
    assert f"{folder} is in use by another run (pid {os.getpid()}" in out and "first-run" in out
    assert "records" not in out and "Traceback" not in out  # refused before the data was even read


@pytest.mark.parametrize("name", ["../../x", "a/../../b", "/abs/path", "", " ", "./x", "a//b", "~/x", "C:\\x"])
def test_experiment_name_never_escapes_output_dir(compose_config, name):
    cfg = compose_config("~experiment")
    cfg.experiment_name = name
    with pytest.raises(ConfigError, match="experiment_name"):
        validate(cfg)


def test_readme_example_commands_get_folders_of_their_own(compose_config):
    """The README's examples (and the issue's pair) compose to different experiment names, so running them in
    any order never makes one meet another's checkpoints; an explicit experiment_name is kept as given."""
    commands = [
        [],  # python launch.py
        ["experiment=local_test", "model.path=meta-llama/Llama-3.2-1B-Instruct", "data=custom_es",
         "data.path=train.json"],
        ["data=huatuo_en", "data.path=medical_o1_sft.json", "optimizer.learning_rate=1e-5", "train.n_epochs=2"],
        ["experiment=local_test", "model=tiny_random"],
        ["experiment=local_test", "model.path=/models/llama-es", "data=custom_es", "data.path=/data/es.jsonl"],
        ["experiment=rl_smoke"],
        ["data=demo_es_en", "data.max_seq_len=1152"],
        ["data=mixture", "data.mixture=[{path: data/demo_data.json, weight: 0.7}, {path: en.json, format: huatuo, "
                         "weight: 0.3}]"],
        ["data=mixture", "data.mixture=[{path: data/demo_data.json, weight: 0.5}, {path: en.json, format: huatuo, "
                         "weight: 0.5}]"],
    ]
    names = [compose_config(*c).experiment_name for c in commands]
    assert len(set(names)) == len(names), names
    assert names[0] == "demo_smollm2-135m-instruct_demo_data"
    assert names[3] == "local_test_tiny-random-llama_demo_data" and names[4] == "local_test_llama-es_es"
    # A mixture has no data.path: its group's name and a hash of its sources (other weights: another folder).
    assert re.fullmatch(r"demo_smollm2-135m-instruct_demo_es_en-[0-9a-f]{6}", names[6]), names[6]
    assert names[7].startswith("demo_smollm2-135m-instruct_mixture-") and names[7] != names[8]
    assert compose_config("experiment_name=mine", "model=tiny_random").experiment_name == "mine"
    resolved = OmegaConf.to_container(compose_config("experiment=local_test", "data=custom_es"), resolve=True)
    assert resolved["experiment_name"] == "local_test_smollm2-135m-instruct"  # an unset data.path is left out
