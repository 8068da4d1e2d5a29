"""Sweep report, callback and per-job wrapper against synthetic job folders (no training, fast)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from medsft.sweep import FINAL_FILE
from medsft.sweep import report as rep
from medsft.sweep.callbacks import SweepCallback
from medsft.sweep.job import job_checkpoint_output_dir, sweep_id, write_final

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_valid_png(path: Path) -> None:
    import matplotlib.image as mpimg

    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    pixels = mpimg.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100


def make_job(sweep: Path, num: int, overrides: list[str], losses: list[float] | None = None, val: float | None = None,
             status: str = "completed", error: str | None = None, final: bool = True) -> Path:
    job = sweep / f"{num}_{','.join(o for o in overrides)}"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides), encoding="utf-8")
    lines = []
    for step, loss in enumerate(losses or [], start=1):
        lines.append({"kind": "train", "step": step, "loss": loss, "lr": 1e-4})
    if val is not None:
        lines.append({"kind": "val", "step": len(losses or []), "val_loss": val})
    objective = val if val is not None else (losses[-1] if losses else None)
    if status == "completed":
        lines.append({"kind": "summary", "steps": len(losses or []), "final_train_loss": losses[-1],
                      "val_loss_after": val, "objective": objective})
    text = "".join(json.dumps(r) + "\n" for r in lines)
    if status == "incomplete":
        text += '{"kind": "train", "step": 9, "lo'  # a line cut short by a killed job
    (job / "metrics.jsonl").write_text(text, encoding="utf-8")
    if final and status == "completed":
        write_final(job, {"status": "completed", "job_num": num, "overrides": overrides, "objective": objective,
                          "duration_s": 1.5})
    if status == "failed":
        write_final(job, {"status": "failed", "job_num": num, "overrides": overrides, "error": error,
                          "objective": None})
    return job


@pytest.fixture
def grid_sweep(tmp_path: Path) -> Path:
    sweep = tmp_path / "multirun_outputs" / "2026-11-29" / "10-00-00"
    common = ["model=tiny_random"]
    make_job(sweep, 0, common + ["optimizer.learning_rate=1e-5", "data.max_seq_len=1024"], [3.0, 2.5], val=2.4)
    make_job(sweep, 1, common + ["optimizer.learning_rate=1e-5", "data.max_seq_len=2048"], [3.0, 2.2], val=2.1)
    make_job(sweep, 2, common + ["optimizer.learning_rate=5e-6", "data.max_seq_len=1024"], [3.0, 2.8], val=2.9)
    make_job(sweep, 3, common + ["optimizer.learning_rate=5e-6", "data.max_seq_len=2048"], [3.0, 2.6], val=2.5,
             final=False)  # summary only: still completed
    return sweep


def read_csv(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_grid_report_ranks_best_first_and_writes_valid_plots(grid_sweep: Path):
    report = rep.write_report(grid_sweep)
    assert report.swept == ["optimizer.learning_rate", "data.max_seq_len"]
    assert report.common == ["model=tiny_random"]
    rows = read_csv(grid_sweep / "report.csv")
    assert [int(r["job"]) for r in rows] == [1, 0, 3, 2]
    assert [float(r["objective"]) for r in rows] == sorted(float(r["objective"]) for r in rows)
    assert [r["rank"] for r in rows] == ["1", "2", "3", "4"]
    assert rows[0]["optimizer.learning_rate"] == "1e-5" and rows[0]["data.max_seq_len"] == "2048"
    assert all(r["status"] == "completed" for r in rows)
    md = (grid_sweep / "report.md").read_text(encoding="utf-8")
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 4  # header + one row per job
    assert "**Best:** job 1" in md
    for name in ("loss_curves.png", "objective_vs_optimizer.learning_rate.png", "objective_vs_data.max_seq_len.png"):
        assert_valid_png(grid_sweep / name)
        assert f"({name})" in md


def test_failed_and_incomplete_jobs_are_listed_last_with_their_error(tmp_path: Path):
    sweep = tmp_path / "sweep"
    make_job(sweep, 0, ["data.max_seq_len=8"], status="failed", error="no training example fits data.max_seq_len=8")
    make_job(sweep, 1, ["data.max_seq_len=128"], [5.0, 4.0], val=4.5)
    make_job(sweep, 2, ["data.max_seq_len=256"], [5.0], status="incomplete")
    make_job(sweep, 3, ["data.max_seq_len=512"], [5.0, 3.0])  # no validation split: objective = train loss
    report = rep.write_report(sweep)
    assert [(j.num, j.status) for j in report.jobs] == [(3, "completed"), (1, "completed"), (0, "failed"),
                                                          (2, "incomplete")]
    assert report.jobs[0].objective == 3.0
    assert [j.num for j in report.failed] == [0]
    rows = read_csv(sweep / "report.csv")
    assert rows[2]["error"] == "no training example fits data.max_seq_len=8" and rows[2]["rank"] == ""
    assert rows[3]["final_train_loss"] == "5.0"  # what the incomplete job got to
    md = (sweep / "report.md").read_text(encoding="utf-8")
    assert "1 failed, 1 incomplete" in md and "## Failed jobs" in md and "no training example fits" in md
    assert_valid_png(sweep / "loss_curves.png")
    assert_valid_png(sweep / "objective_vs_data.max_seq_len.png")


def test_direction_from_the_sweep_and_categorical_parameters(tmp_path: Path):
    sweep = tmp_path / "sweep"
    make_job(sweep, 0, ["model=a"], [1.0], val=0.2)
    make_job(sweep, 1, ["model=b"], [1.0], val=0.7)
    (sweep / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"sweeper": {"direction": "maximize"}}}))
    report = rep.write_report(sweep)
    assert report.direction == "maximize" and report.best.num == 1
    assert rep.write_report(sweep, direction="minimize").best.num == 0
    assert_valid_png(sweep / "objective_vs_model.png")


def test_job_folders_are_found_nested_but_not_inside_checkpoints_or_hidden_folders(tmp_path: Path):
    sweep = tmp_path / "sweep"
    job = make_job(sweep, 0, ["data.path=a/b.json"], [1.0])
    (job / "checkpoints" / "checkpoint-0-1").mkdir(parents=True)
    (job / "checkpoints" / "checkpoint-0-1" / "metrics.jsonl").write_text("")
    (sweep / ".submitit" / "123").mkdir(parents=True)
    (sweep / ".submitit" / "123" / "metrics.jsonl").write_text("")
    nested = make_job(sweep / "1_data.path=x", 1, ["data.path=x/y.json"], [2.0])
    found = rep.find_job_dirs(sweep)
    assert found == [job, nested] or sorted(found) == sorted([job, nested])
    jobs = rep.collect(sweep)[0]
    assert sorted(j.num for j in jobs) == [0, 1]


def test_override_parsing_and_numbers():
    assert rep.split_override("optimizer.learning_rate=1e-5") == ("optimizer.learning_rate", "1e-5")
    assert rep.split_override("+foo.bar=x=y") == ("foo.bar", "x=y")
    assert rep.split_override("~data.val_path") == ("data.val_path", "")
    assert rep.to_number("1e-5") == pytest.approx(1e-5) and rep.to_number("2048") == 2048.0
    assert rep.to_number("tiny_random") is None and rep.to_number(True) is None
    assert rep.plot_filename("hydra/launcher") == "objective_vs_hydra_launcher.png"


def test_empty_or_missing_sweep_folder_is_a_clear_error(tmp_path: Path):
    from medsft.errors import MedsftError

    with pytest.raises(MedsftError, match="no job folders"):
        rep.write_report(tmp_path)
    with pytest.raises(MedsftError, match="not found"):
        rep.write_report(tmp_path / "nope")


def test_cli_subcommand(grid_sweep: Path, tmp_path: Path, capsys):
    from medsft.cli import main

    out = tmp_path / "elsewhere"
    assert main(["sweep-report", str(grid_sweep), "--out", str(out), "--no-plots"]) == 0
    printed = capsys.readouterr().out
    assert "best: job 1" in printed and (out / "report.md").is_file() and (out / "report.csv").is_file()
    assert not (out / "loss_curves.png").exists()
    assert main(["sweep-report", str(tmp_path / "missing")]) == 1
    assert "sweep-report" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ callback


def _hydra_cfg(sweep_dir: Path, **task):
    from omegaconf import OmegaConf

    return OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep_dir)}, "mode": "MULTIRUN"}, **task})


def test_callback_writes_the_report_and_exits_non_zero_when_a_job_failed(tmp_path: Path, capsys):
    sweep = tmp_path / "sweep"
    make_job(sweep, 0, ["x=1"], [1.0], val=0.5)
    make_job(sweep, 1, ["x=2"], status="failed", error="boom")
    with pytest.raises(SystemExit) as exit_info:
        SweepCallback().on_multirun_end(_hydra_cfg(sweep))
    assert exit_info.value.code == 1
    assert (sweep / "report.md").is_file() and (sweep / "loss_curves.png").is_file()
    assert "job 1: boom" in capsys.readouterr().err


def test_callback_success_and_report_switch(tmp_path: Path):
    sweep = tmp_path / "sweep"
    make_job(sweep, 0, ["x=1"], [1.0], val=0.5)
    SweepCallback().on_multirun_end(_hydra_cfg(sweep, sweep={"report": False}))
    assert not (sweep / "report.md").exists()
    SweepCallback().on_multirun_end(_hydra_cfg(sweep))
    assert (sweep / "report.md").is_file()


def test_callback_records_a_job_that_hydra_saw_fail(tmp_path: Path):
    from hydra.core.utils import JobReturn, JobStatus
    from omegaconf import OmegaConf

    job_dir = tmp_path / "0_x=1"
    job_dir.mkdir()
    cfg = OmegaConf.create({"hydra": {"mode": "MULTIRUN", "runtime": {"output_dir": str(job_dir)}, "job": {"num": 0}}})
    ret = JobReturn(overrides=["x=1"], status=JobStatus.FAILED, _return_value=RuntimeError("kaput"))
    SweepCallback().on_job_end(cfg, ret)
    final = json.loads((job_dir / FINAL_FILE).read_text())
    assert final["status"] == "failed" and final["error"] == "kaput" and final["overrides"] == ["x=1"]


# ------------------------------------------------------------------------------------------ per-job wrapper


def test_each_job_gets_its_own_checkpoint_root(tmp_path: Path):
    from omegaconf import OmegaConf

    sweep = tmp_path / "multirun_outputs" / "2026-11-29" / "10-00-00"
    cfg = OmegaConf.create({"output_dir": str(tmp_path / "ckpts"), "experiment_name": "exp"})
    a = job_checkpoint_output_dir(cfg, sweep, sweep / "0_lr=1", "output_dir")
    b = job_checkpoint_output_dir(cfg, sweep, sweep / "1_lr=2", "output_dir")
    assert a != b and a == tmp_path / "ckpts" / "sweeps" / "2026-11-29_10-00-00" / "0_lr=1"
    assert job_checkpoint_output_dir(cfg, sweep, sweep / "0_lr=1", "job_dir") == sweep / "0_lr=1" / "checkpoints"
    assert sweep_id(Path("multirun_outputs/2026-11-29/10-00-00")) == "2026-11-29_10-00-00"
    from medsft.errors import ConfigError

    with pytest.raises(ConfigError, match="sweep.checkpoints"):
        job_checkpoint_output_dir(cfg, sweep, sweep / "0", "elsewhere")


def _multirun_hydra(sweep: Path, job_dir: Path, overrides: list[str]):
    """Set HydraConfig as Hydra does inside a multirun job."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict, read_write

    from medsft.config import compose

    cfg = compose(overrides, return_hydra_config=True)
    with read_write(cfg.hydra), open_dict(cfg.hydra):
        cfg.hydra.sweep.dir = str(sweep)
        cfg.hydra.runtime.output_dir = str(job_dir)
        cfg.hydra.job.num = 0
        cfg.hydra.job.id = "0"
        cfg.hydra.mode = RunMode.MULTIRUN
    HydraConfig.instance().set_config(cfg)
    task = cfg.copy()
    with read_write(task), open_dict(task):
        del task["hydra"]
    return task


@pytest.fixture
def clean_hydra():
    from hydra.core.hydra_config import HydraConfig

    yield
    HydraConfig.instance().cfg = None


def test_run_job_records_success_and_isolates_checkpoints(tmp_path: Path, clean_hydra):
    from medsft.sweep.job import is_multirun, run_job

    sweep, job_dir = tmp_path / "sweep", tmp_path / "sweep" / "0_lr=1"
    job_dir.mkdir(parents=True)
    cfg = _multirun_hydra(sweep, job_dir, [f"output_dir={tmp_path / 'ck'}", "model=tiny_random"])
    assert is_multirun()
    seen = {}

    def fake_run(job_cfg, run_dir):
        seen["output_dir"], seen["run_dir"] = job_cfg.output_dir, run_dir
        (Path(run_dir) / "metrics.jsonl").write_text(json.dumps({"kind": "summary", "objective": 1.25, "steps": 3}))
        return 1.25

    assert run_job(cfg, fake_run) == 1.25
    assert seen["run_dir"] == job_dir and Path(seen["output_dir"]).parent.name == sweep_id(sweep)
    link = job_dir / "checkpoints"
    assert link.is_symlink() and link.resolve() == (Path(seen["output_dir"]) / cfg.experiment_name).resolve()
    final = json.loads((job_dir / FINAL_FILE).read_text())
    assert final["status"] == "completed" and final["objective"] == 1.25 and final["steps"] == 3
    assert final["overrides"] == [f"output_dir={tmp_path / 'ck'}", "model=tiny_random"]


def test_run_job_failure_is_recorded_and_continues_or_stops(tmp_path: Path, clean_hydra, capsys):
    from medsft.errors import DataError
    from medsft.sweep.job import run_job

    sweep, job_dir = tmp_path / "sweep", tmp_path / "sweep" / "0_x"
    job_dir.mkdir(parents=True)

    def failing(job_cfg, run_dir):
        raise DataError("no training example fits data.max_seq_len=8")

    cfg = _multirun_hydra(sweep, job_dir, [f"output_dir={tmp_path / 'ck'}"])
    assert run_job(cfg, failing) is None
    final = json.loads((job_dir / FINAL_FILE).read_text())
    assert final["status"] == "failed" and final["error_type"] == "DataError" and final["exit_code"] == 3
    assert "max_seq_len=8" in final["error"] and "Traceback" in final["traceback"]
    assert final["checkpoint_dir"] is None and not (job_dir / "checkpoints").is_symlink()  # nothing saved: no link
    assert "sweep job 0 failed" in capsys.readouterr().err

    cfg = _multirun_hydra(sweep, job_dir, [f"output_dir={tmp_path / 'ck'}", "sweep.continue_on_failure=false"])
    with pytest.raises(SystemExit) as exit_info:
        run_job(cfg, failing)
    assert exit_info.value.code == 3
    assert (sweep / "report.md").is_file()  # the sweep stops, its report is still written


def test_job_folder_names_stay_short_and_flat():
    from medsft.sweep import job_dirname

    assert job_dirname("data.max_seq_len=128,optimizer.learning_rate=1e-05") == \
        "data.max_seq_len=128,optimizer.learning_rate=1e-05"  # Hydra's name when it fits
    assert job_dirname("data.path=data/x.json,seed=1") == "data.path=data_x.json,seed=1"
    trial = ",".join(f"optimizer.{k}=0.1234567890123456" for k in ("learning_rate", "warmup_rates", "weight_decay"))
    long = "data.max_samples=16,generation_check.enabled=False,logging.progress_bar=False," + trial
    assert len(long) > 200
    assert job_dirname(long) == ("data.max_samples=16,generation_check.enabled=False,logging.progress_bar=False,"
                                 "optimizer.learning_rate=0.1235,optimizer.warmup_rates=0.1235,"
                                 "optimizer.weight_decay=0.1235")
    longer = "checkpoint.save_at_epoch_end=False,data.overlong=truncate,train.train_bsz_per_gpu=2," + long
    assert job_dirname(longer) == ("save_at_epoch_end=False,overlong=truncate,train_bsz_per_gpu=2,max_samples=16,"
                                   "enabled=False,progress_bar=False,learning_rate=0.1235,warmup_rates=0.1235,"
                                   "weight_decay=0.1235")
    cut = job_dirname("a=" + "x" * 400)
    assert len(cut) <= 200 and cut != job_dirname("a=" + "x" * 399)


def test_checkpoint_eval_accuracies_come_with_their_95_interval(tmp_path: Path):
    """A sweep whose jobs ran checkpoint evals reports the last one's accuracy with its Wilson interval (issue 16),
    in the markdown table and the CSV."""
    from medsft.eval.report import wilson_interval

    sweep = tmp_path / "sweep"
    for num, correct in ((0, 12), (1, 30)):
        job = make_job(sweep, num, [f"optimizer.learning_rate={num + 1}e-5"], losses=[3.0, 2.5], val=2.4 - num * 0.1)
        with (job / "metrics.jsonl").open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({"kind": "checkpoint_eval", "step": 1, "benchmark": "headqa_es", "n": 50,
                                     "accuracy": 0.5}) + "\n")
            record = {"kind": "checkpoint_eval", "step": 2, "benchmark": "headqa_es", "n": 50, "n_correct": correct,
                      "accuracy": correct / 50}
            if num == 0:  # a record from before n_correct was logged: the interval from accuracy x n
                del record["n_correct"]
            handle.write(json.dumps(record) + "\n")
    report = rep.write_report(sweep)
    text = (sweep / "report.md").read_text(encoding="utf-8")
    lo, hi = wilson_interval(12, 50)
    assert f"| {100 * 12 / 50:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] |" in text  # 24.0% [14.3, 37.4]
    assert "eval_accuracy: the last checkpoint eval of each job (headqa_es, 50 questions)" in text
    rows = {r["job"]: r for r in csv.DictReader((sweep / "report.csv").open(encoding="utf-8"))}
    lo30, hi30 = wilson_interval(30, 50)
    assert float(rows["1"]["eval_accuracy"]) == 0.6 and float(rows["1"]["eval_accuracy_ci95_lo"]) == round(lo30, 4)
    assert float(rows["1"]["eval_accuracy_ci95_hi"]) == round(hi30, 4) and rows["1"]["eval_step"] == "2"
    assert report.jobs[0].metrics["eval_n"] == 50
