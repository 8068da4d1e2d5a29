"""End-to-end multiruns of the tiny random model: grid sweep, a failing job, Optuna, submitit (seconds per job)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.slow


@pytest.fixture
def tiny(tmp_path: Path, models_cache_dir: Path, tiny_model_dir: str):
    """Overrides for seconds-long jobs of tiny-random (built once per session) writing only under tmp_path."""

    def overrides(max_steps: int = 2) -> list[str]:
        return [
            "model=tiny_random", "train.mixed_precision=no", "logging=none", "logging.progress_bar=false",
            "generation_check.enabled=false",
            f"train.max_steps={max_steps}", "train.train_bsz_per_gpu=2", "data.max_samples=16", "data.val_ratio=0.125",
            "data.overlong=truncate", f"model.cache_dir={models_cache_dir}", f"data.cache_dir={tmp_path / 'data'}",
            f"output_dir={tmp_path / 'ckpts'}", f"log_dir={tmp_path / 'logs'}", f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ]

    return overrides


SECRET = "hf_SWEEPTESTSECRET0123456789"


def launch(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "1",
           "HF_TOKEN": SECRET, "WANDB_API_KEY": SECRET}
    return subprocess.run([sys.executable, "launch.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def job_dirs(sweep: Path) -> list[Path]:
    jobs = [p for p in sweep.iterdir() if p.is_dir() and p.name[0].isdigit()]
    return sorted(jobs, key=lambda p: int(p.name.split("_")[0]))


def report_rows(sweep: Path) -> list[dict]:
    with (sweep / "report.csv").open(encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def assert_valid_png(path: Path) -> None:
    import matplotlib.image as mpimg

    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    assert mpimg.imread(path).shape[0] > 100


def explain(result: subprocess.CompletedProcess) -> str:
    return f"rc={result.returncode}\n--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-4000:]}"


def test_grid_multirun_2x2_job_folders_report_and_plots(tmp_path: Path, tiny):
    result = launch("--multirun", *tiny(), "optimizer.learning_rate=1e-3,1e-4", "data.max_seq_len=256,512")
    assert result.returncode == 0, explain(result)
    sweep = tmp_path / "sweep"
    jobs = job_dirs(sweep)
    assert len(jobs) == 4, [p.name for p in jobs]
    # <num>_<overrides> (paths such as output_dir left out; long names shortened: keys by their last part).
    assert jobs[0].name.startswith("0_") and "output_dir" not in jobs[0].name
    assert "learning_rate=0.001," in jobs[0].name and "max_seq_len=256," in jobs[0].name
    assert "learning_rate=0.0001," in jobs[3].name and "max_seq_len=512," in jobs[3].name
    roots = set()
    for job in jobs:
        config = yaml.safe_load((job / ".hydra" / "config.yaml").read_text())
        assert config["model"]["path"] == "tiny-random:llama" and "hydra" not in config
        assert (job / "launch.log").is_file()
        kinds = {json.loads(line)["kind"] for line in (job / "metrics.jsonl").read_text().splitlines()}
        assert {"train", "val", "summary"} <= kinds
        final = json.loads((job / "final.json").read_text())
        assert final["status"] == "completed" and final["objective"] == final["val_loss_after"]
        link = job / "checkpoints"
        assert link.is_symlink() and sorted(p.name for p in link.iterdir()) == ["checkpoint-0-2"]
        roots.add(link.resolve())
        assert link.resolve().is_relative_to(tmp_path / "ckpts" / "sweeps")
    assert len(roots) == 4  # no two jobs share (or resume from) a checkpoint folder
    text_suffixes = (".yaml", ".json", ".log", ".jsonl", ".md", ".csv")
    written = [p for p in sweep.rglob("*") if p.is_file() and p.suffix in text_suffixes]
    assert written and not [p for p in written if SECRET in p.read_text(errors="ignore")]  # no token from the env
    assert sorted(p.name for p in (tmp_path / "ckpts").iterdir()) == ["sweeps"]  # no shared experiment folder

    rows = report_rows(sweep)
    assert len(rows) == 4 and all(r["status"] == "completed" for r in rows)
    objectives = [float(r["objective"]) for r in rows]
    assert objectives == sorted(objectives)
    by_num = {int(j.name.split("_")[0]): json.loads((j / "final.json").read_text())["objective"] for j in jobs}
    assert [by_num[int(r["job"])] for r in rows] == pytest.approx(objectives)
    assert {float(r["optimizer.learning_rate"]) for r in rows} == {1e-3, 1e-4}
    md = (sweep / "report.md").read_text()
    assert len([line for line in md.splitlines() if line.startswith("| ")]) == 5
    for name in ("loss_curves.png", "objective_vs_optimizer.learning_rate.png", "objective_vs_data.max_seq_len.png"):
        assert_valid_png(sweep / name)
    assert "sweep report" in result.stdout

    # The same report from the command line, elsewhere.
    out = tmp_path / "again"
    from medsft.cli import main

    assert main(["sweep-report", str(sweep), "--out", str(out), "--no-plots"]) == 0
    assert [r["job"] for r in report_rows(out)] == [r["job"] for r in rows]


def test_a_failing_job_is_recorded_the_others_run_and_the_exit_code_says_so(tmp_path: Path, tiny):
    # max_seq_len=8: not even a prompt fits, so that job finds no training example and fails at data loading.
    result = launch("--multirun", *tiny(max_steps=1), "data.max_seq_len=8,128")
    assert result.returncode == 1, explain(result)
    sweep = tmp_path / "sweep"
    failed_job, good_job = job_dirs(sweep)
    failed = json.loads((failed_job / "final.json").read_text())
    assert failed["status"] == "failed" and failed["error_type"] == "DataError" and "max_seq_len" in failed["error"]
    assert not (failed_job / "checkpoints").exists()
    assert json.loads((good_job / "final.json").read_text())["status"] == "completed"
    rows = report_rows(sweep)
    assert [(r["job"], r["status"]) for r in rows] == [("1", "completed"), ("0", "failed")]
    assert "max_seq_len" in rows[1]["error"]
    assert "1 sweep job(s) failed" in result.stderr
    assert "## Failed jobs" in (sweep / "report.md").read_text()


def test_optuna_preset_runs_three_trials(tmp_path: Path, tiny):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    result = launch("--multirun", "hparams_search=lr_optuna", "hydra.sweeper.n_trials=3", *tiny(max_steps=1),
                    "data.max_seq_len=128")
    assert result.returncode == 0, explain(result)
    sweep = tmp_path / "sweep"
    jobs = job_dirs(sweep)
    assert len(jobs) == 3
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["name"] == "optuna" and set(best["best_params"]) == {
        "optimizer.learning_rate", "optimizer.warmup_rates", "optimizer.weight_decay"}
    assert 1e-6 <= best["best_params"]["optimizer.learning_rate"] <= 3e-4
    rows = report_rows(sweep)
    assert len(rows) == 3 and all(r["status"] == "completed" for r in rows)
    assert float(rows[0]["objective"]) == pytest.approx(best["best_value"])
    assert "hparams_search" not in jobs[0].name  # kept out of the job folder names
    assert_valid_png(sweep / "objective_vs_optimizer.learning_rate.png")


def test_slurm_preset_composes(tmp_path: Path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    result = launch("hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=4",
                    "--cfg", "hydra", timeout=120)
    assert result.returncode == 0, explain(result)
    launcher = yaml.safe_load(result.stdout)["hydra"]["launcher"]
    assert launcher["_target_"].endswith("submitit_launcher.SlurmLauncher")
    assert (launcher["partition"], launcher["gpus_per_node"], launcher["nodes"]) == ("gpu", 4, 1)
    assert launcher["timeout_min"] == 1440


def test_submitit_local_executor_runs_one_job(tmp_path: Path, tiny):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    result = launch("--multirun", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5",
                    *tiny(max_steps=1), "data.max_seq_len=128", "optimizer.learning_rate=1e-3")
    assert result.returncode == 0, explain(result)
    sweep = tmp_path / "sweep"
    (job,) = job_dirs(sweep)
    assert json.loads((job / "final.json").read_text())["status"] == "completed"
    assert (sweep / ".submitit").is_dir()
    assert [r["status"] for r in report_rows(sweep)] == ["completed"]
