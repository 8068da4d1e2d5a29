"""Distributed training: the DeepSpeed JSON, the relaunch through `accelerate launch`, and real 2-process runs.

The multi-process runs go through the real entry point (`python launch.py launcher=cpu_2proc ...` re-invokes
itself via `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2`, gloo on CPU) on the tiny
random model. All runs share one recipe, so their step 1 sees the same 8 examples:

    reference   1 process  x bsz 4 x accumulation 2     (in this process)
    ddp         2 processes x bsz 2 x accumulation 2     plain DDP
    zero2/3     2 processes x bsz 2 x accumulation 2     DeepSpeed ZeRO-2 / ZeRO-3

Global batch 8 everywhere: same LR schedule, same step-1 loss and grad norm (the per-token mean over all
processes, and DeepSpeed's own divisions by accumulation steps and world undone by loss_scale_for). Step 3's
loss is made NaN in every run (MEDSFT_TEST_FAULTS), so every run skips it — under DeepSpeed through its own
overflow skip. Each process writes a debug dump (MEDSFT_DEBUG_DUMP): step counts, a hash of the full weights,
the LR in the real optimizer, and on rank 0 the logits of a fixed input, which a checkpoint reloaded here with
plain from_pretrained must reproduce (ZeRO-3: full gathered weights, not an empty save).

DeepSpeed's first use JIT-compiles a shared-memory op (~25 s, cached in ~/.cache/torch_extensions).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf, open_dict

from medsft.errors import ConfigError
from medsft.runtime.allocator import glibc_malloc
from medsft.train import checkpoint as ckpt
from medsft.outputs import read_records as read_metrics
from medsft.train.optim import lr_multiplier
from train_utils import CONF, ROOT, launch, tiny_overrides, train_in_process

RUN_TIMEOUT_S = 420  # a hang at exit fails the test instead of blocking the suite
NAN_STEP = 3
TOTAL_STEPS = 12  # 42 train examples, global micro-batch 4, accumulation 2 -> 6 steps per epoch, 2 epochs
RECIPE = (
    "train.gradient_accumulation_steps=2",
    "train.n_epochs=2",
    "optimizer.warmup_rates=0.2",
    "checkpoint.save_at_epoch_end=false",
)


def _records(run_dir: Path, kind: str) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == kind]


def _dump(dump_dir: Path) -> dict[int, dict]:
    return {rank: json.loads((dump_dir / f"rank{rank}.json").read_text()) for rank in (0, 1)}


def _env(dump_dir: Path) -> dict:
    return {**os.environ, "MEDSFT_DEBUG_DUMP": str(dump_dir), "MEDSFT_TEST_FAULTS": f"nan_at_steps={NAN_STEP}"}


def _launch_two(tmp: Path, *extra: str):
    result = launch(*tiny_overrides(tmp), *RECIPE, "launcher=cpu_2proc", "train.train_bsz_per_gpu=2", *extra,
                    f"hydra.run.dir={tmp / 'run'}", env=_env(tmp / "dump"), timeout=RUN_TIMEOUT_S)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    # The gloo abort at exit this project has seen ("terminate called without an active exception").
    assert "terminate called" not in output and "Aborted" not in output
    return {"dir": tmp, "run": tmp / "run", "out": output, "dump": _dump(tmp / "dump"),
            "train": _records(tmp / "run", "train"), "summary": _records(tmp / "run", "summary")[-1]}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MEDSFT_TEST_FAULTS", f"nan_at_steps={NAN_STEP}")
        patch.setenv("MEDSFT_DEBUG_DUMP", str(tmp / "dump"))
        _, run_dir = train_in_process(tmp, *RECIPE, "train.train_bsz_per_gpu=4")
    return {"train": _records(run_dir, "train"), "summary": _records(run_dir, "summary")[-1],
            "dump": json.loads((tmp / "dump" / "rank0.json").read_text())}


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    return _launch_two(tmp_path_factory.mktemp("ddp"))


@pytest.fixture(scope="module")
def zero2(tmp_path_factory):
    return _launch_two(tmp_path_factory.mktemp("zero2"), "deepspeed=zero2_local")


# ZeRO-3 also answers the before/after questions and evaluates its checkpoint, each in a worker process on the
# folder holding the weights (no process has them all); the checkpoint eval needs the shared HEAD-QA files.
ZERO3_CHECKS = ("generation_check.enabled=true", "generation_check.num_questions=2",
                "generation_check.max_new_tokens=4", "generation_check.batch_size=2")
ZERO3_CHECKPOINT_EVAL = ("checkpoint.eval_benchmark=headqa_es", "checkpoint.eval_limit=2",
                         "checkpoint.eval_max_new_tokens=4")


def _headqa_present() -> bool:
    from medsft.paths import shared_data_dir

    return (shared_data_dir() / "headqa_es").is_dir()


@pytest.fixture(scope="module")
def zero3(tmp_path_factory):
    extra = (*ZERO3_CHECKS, *(ZERO3_CHECKPOINT_EVAL if _headqa_present() else ()))
    return _launch_two(tmp_path_factory.mktemp("zero3"), "deepspeed=zero3", *extra)


def _expected_lr(step: int, lr: float = 3e-3) -> float:
    warmup = math.ceil(0.2 * TOTAL_STEPS)
    return lr * lr_multiplier(step - 1, TOTAL_STEPS, warmup, "cosine")


def _check_run_against_reference(run: dict, reference: dict) -> None:
    """Same schedule, same step-1 figures, same skipped step, learning, every rank stepping, equal weights."""
    train, ref = run["train"], reference["train"]
    assert [r["step"] for r in train] == list(range(1, TOTAL_STEPS + 1))
    assert "global batch 8 = 2 per device x 2 accumulation x 2 processes" in run["out"]
    for got, want in zip(train, ref):
        assert got["lr"] == pytest.approx(want["lr"], rel=1e-12)
        assert got["lr"] == pytest.approx(_expected_lr(got["step"]), rel=1e-12)
        assert (got["samples_seen"], got["samples"], got["loss_tokens"]) == (
            want["samples_seen"], want["samples"], want["loss_tokens"])
        assert got["skipped_total"] == want["skipped_total"] == (1 if got["step"] >= NAN_STEP else 0)
    # Step 1: the per-token mean over both processes = one process holding both halves; gradient scale too.
    assert train[0]["loss"] == pytest.approx(ref[0]["loss"], rel=1e-6)
    assert train[0]["grad_norm"] == pytest.approx(ref[0]["grad_norm"], rel=1e-5)
    for got, want in zip(train, ref):  # later steps drift only by float reduction order
        if got["step"] != NAN_STEP:
            assert got["loss"] == pytest.approx(want["loss"], rel=2e-3)
    assert train[-1]["loss"] < 0.95 * train[0]["loss"], (train[0]["loss"], train[-1]["loss"])
    assert run["summary"]["skipped_steps"] == 1 and run["summary"]["steps"] == TOTAL_STEPS

    dumps = run["dump"]
    for rank, dump in dumps.items():
        assert dump["rank"] == rank and dump["world"] == 2
        assert dump["global_step"] == TOTAL_STEPS and dump["skipped_steps"] == 1
        assert dump["optimizer_steps"] == TOTAL_STEPS - 1  # both ranks really stepped, and skipped the NaN step
        assert dump["num_parameters"] == reference["dump"]["num_parameters"]
        # After the last step the scheduler stands at step TOTAL_STEPS: cosine end = 0, in the real optimizer.
        assert dump["lr_in_optimizer"] == pytest.approx(0.0, abs=1e-12)
    assert dumps[0]["weights_sha256"] == dumps[1]["weights_sha256"]


# ------------------------------------------------------------------------------------------ multi-process runs


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_two_processes_through_the_relaunch(ddp, reference):
    _check_run_against_reference(ddp, reference)
    assert "starting 2 process(es)" in ddp["out"] and "--multi_gpu" in ddp["out"]
    assert ddp["dump"][0]["deepspeed"] is None and ddp["dump"][0]["loss_scale"] == 4.0
    # Rank 0 logs, the other rank only warns; one log file per rank in the run folder.
    assert ddp["out"].count("processes: 2, device: cpu") == 1
    if glibc_malloc() is not None:  # train.cpu_malloc_mmap_threshold_mb's default, said once
        assert ddp["out"].count("allocator: glibc mmap threshold fixed at 4 MiB") == 1
    assert (ddp["run"] / "train_rank0.log").is_file() and (ddp["run"] / "train_rank1.log").is_file()


@pytest.mark.slow
@pytest.mark.distributed
def test_deepspeed_zero2_two_processes(zero2, ddp, reference):
    _check_run_against_reference(zero2, reference)
    ds = zero2["dump"][0]["deepspeed"]
    assert ds["zero_stage"] == 2 and ds["dp_world_size"] == 2
    batch = (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"])
    assert batch == (2, 2, 8)
    assert ds["skipped_steps"] == 1  # DeepSpeed's own overflow skip of the NaN step, no stale gradients after it
    assert zero2["dump"][0]["loss_scale"] == 4.0
    # DDP's curve to float noise (ZeRO-2 reduces every micro-batch, DDP once per step): DeepSpeed's skip of the
    # NaN step left no trace, neither stale gradients nor an Adam update.
    ddp_train = {r["step"]: r for r in ddp["train"]}
    for record in zero2["train"]:
        if record["step"] != NAN_STEP:
            assert record["loss"] == pytest.approx(ddp_train[record["step"]]["loss"], rel=1e-6)
            assert record["grad_norm"] == pytest.approx(ddp_train[record["step"]]["grad_norm"], rel=1e-5)


@pytest.mark.slow
@pytest.mark.distributed
def test_deepspeed_zero3_two_processes_saves_full_weights_that_reload(zero3, reference):
    from safetensors import safe_open
    from transformers import AutoConfig

    _check_run_against_reference(zero3, reference)
    ds = zero3["dump"][0]["deepspeed"]
    assert ds["zero_stage"] == 3 and ds["skipped_steps"] == 1 and ds["train_batch_size"] == 8

    latest = ckpt.latest_complete_checkpoint(zero3["dir"] / "ckpts" / "tiny")
    assert latest is not None and latest.name.endswith(f"-{TOTAL_STEPS}")
    # Full weights, not the empty/partitioned tensors of a naive ZeRO-3 save.
    config = AutoConfig.from_pretrained(latest)
    with safe_open(str(latest / "model.safetensors"), framework="pt") as handle:
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    assert shapes["model.embed_tokens.weight"] == (config.vocab_size, config.hidden_size)
    assert all(math.prod(shape) > 0 for shape in shapes.values())
    assert sum(math.prod(shape) for shape in shapes.values()) == zero3["dump"][0]["num_parameters"]

    # A fresh process (this one) reloads it with plain from_pretrained: the job's logits, exactly.
    assert_reloads_to_the_jobs_logits(zero3["dir"], latest)


def assert_reloads_to_the_jobs_logits(job_dir: Path, checkpoint: Path) -> None:
    """Plain from_pretrained of `checkpoint` in this process gives the logits the job dumped for its inputs."""
    from transformers import AutoModelForCausalLM

    reference_logits = torch.load(job_dir / "dump" / "reference_logits.pt")
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    with torch.no_grad():
        logits = model(reference_logits["input_ids"]).logits
    torch.testing.assert_close(logits, reference_logits["logits"], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.distributed
def test_zero3_runs_the_generation_check_and_checkpoint_eval_on_saved_folders(zero3):
    """Under ZeRO-3 the before/after answers come from a worker on the base model and on the final checkpoint,
    the checkpoint eval from a worker on the checkpoint just saved; the log says so (issue 16: they were
    skipped, the production preset had no checkpoint eval)."""
    out, run = zero3["out"], zero3["run"]
    assert "generation check before training: ZeRO-3 shards the weights, so a separate process answers from " \
           "tiny-random:llama" in out
    latest = ckpt.latest_complete_checkpoint(zero3["dir"] / "ckpts" / "tiny")
    assert f"generation check after training: ZeRO-3 shards the weights, so a separate process answers from {latest}" in out
    records = read_metrics(run / "metrics.jsonl")
    gen = {r["when"]: r for r in records if r["kind"] == "generation"}
    assert gen["before"]["step"] == 0 and gen["after"]["step"] == TOTAL_STEPS
    for when in ("before", "after"):
        rows = [json.loads(line) for line in (run / f"generations_{when}.jsonl").read_text().splitlines()]
        assert len(rows) == 2 and all(isinstance(r["answer"], str) for r in rows)
        assert gen[when]["n_questions"] == 2
    assert "BASE MODEL (before)" in out and "FINE-TUNED (after)" in out
    summary = zero3["summary"]
    assert "format_compliance_before" in summary and "format_compliance_after" in summary
    if not _headqa_present():
        pytest.skip("HEAD-QA data not found: the checkpoint eval part needs it")
    assert f"checkpoint eval of {latest.name}: ZeRO-3 shards the weights, so a separate process evaluates" in out
    evals = [r for r in records if r["kind"] == "checkpoint_eval"]
    assert [e["step"] for e in evals] == [TOTAL_STEPS] and evals[0]["n"] == 2 and evals[0]["benchmark"] == "headqa_es"
    assert 0.0 <= evals[0]["accuracy"] <= 1.0 and len(evals[0]["accuracy_ci95"]) == 2


@pytest.mark.slow
@pytest.mark.distributed
def test_sigterm_to_the_launcher_checkpoints_and_returns_the_workers_exit_code(tmp_path):
    """What SLURM does before a time limit: SIGTERM to `python launch.py`. The parent hands it to the training
    processes (not to torchrun, which would SIGKILL them 30 s later), they checkpoint and exit 75, and the
    parent ends with 75, the workers' code, not torchrun's generic 1."""
    import subprocess
    import sys
    import time

    run_dir = tmp_path / "run"
    args = [*tiny_overrides(tmp_path), "launcher=cpu_2proc", "train.train_bsz_per_gpu=2", "train.n_epochs=50",
            "data.val_ratio=0", "checkpoint.save_at_epoch_end=false", f"hydra.run.dir={run_dir}"]
    log = (tmp_path / "out.txt").open("w")
    proc = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), *args], cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        metrics = run_dir / "metrics.jsonl"
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "out.txt").read_text()[-3000:]
            time.sleep(0.5)
        proc.send_signal(15)
        code = proc.wait(timeout=RUN_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    output = (tmp_path / "out.txt").read_text()
    assert code == 75, output[-4000:]
    assert "received SIGTERM" in output and "terminate called" not in output
    latest = ckpt.latest_complete_checkpoint(tmp_path / "ckpts" / "tiny")
    assert latest is not None
    assert ckpt.read_trainer_state(latest)["global_step"] == _records(run_dir, "train")[-1]["step"]


# ------------------------------------------------------------------------------------------ DeepSpeed JSON


@pytest.mark.parametrize("preset", ["zero2_local", "zero3", "zero3_8gpu", "zero3_offload"])
@pytest.mark.parametrize("mixed_precision", ["no", "bf16", "fp16"])
def test_deepspeed_json_comes_from_the_config_and_deepspeed_accepts_it(compose_config, preset, mixed_precision):
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.config import DeepSpeedConfig

    from medsft.runtime.deepspeed import deepspeed_json

    cfg = compose_config(*[f"deepspeed={preset}", "data.path=x.json", "train.train_bsz_per_gpu=3",
                       "train.gradient_accumulation_steps=5", "optimizer.max_grad_norm=0.7"])
    data = deepspeed_json(cfg, mixed_precision, world_size=8)
    assert data["train_micro_batch_size_per_gpu"] == 3 and data["gradient_accumulation_steps"] == 5
    assert data["train_batch_size"] == 3 * 5 * 8 and data["gradient_clipping"] == 0.7
    assert data["bf16"]["enabled"] is (mixed_precision == "bf16")
    assert data["fp16"]["enabled"] is (mixed_precision == "fp16")
    zero = data["zero_optimization"]
    assert zero["stage"] == cfg.deepspeed.zero_stage
    assert ("offload_optimizer" in zero) is bool(cfg.deepspeed.offload_optimizer)
    assert ("offload_param" in zero) is bool(cfg.deepspeed.offload_params)
    if zero["stage"] == 3:
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert deepspeed_json(cfg, mixed_precision)["train_batch_size"] == "auto"  # world from accelerate

    # DeepSpeed's own config models (they refuse unknown keys) accept it once "auto" is filled (world 1 here).
    filled = deepspeed_json(cfg, mixed_precision, world_size=1)
    filled["zero_optimization"] = {k: (10_000 if v == "auto" else v) for k, v in zero.items()}
    parsed = DeepSpeedConfig(filled)
    assert parsed.zero_optimization_stage == zero["stage"] and parsed.gradient_clipping == 0.7
    assert parsed.train_batch_size == 15 and parsed.gradient_accumulation_steps == 5


def test_deepspeed_json_refuses_what_cannot_work(compose_config):
    from medsft.runtime.deepspeed import deepspeed_json

    cfg = compose_config(*["deepspeed=zero2_local", "deepspeed.offload_params=true", "data.path=x.json"])
    with pytest.raises(ConfigError, match="offload_params=true needs deepspeed.zero_stage=3"):
        deepspeed_json(cfg, "no")
    with pytest.raises(ConfigError, match="mixed precision"):
        deepspeed_json(compose_config(*["deepspeed=zero3", "data.path=x.json"]), "fp8")
    no_clip = compose_config(*["deepspeed=zero3", "data.path=x.json", "optimizer.max_grad_norm=0"])
    assert deepspeed_json(no_clip, "no")["gradient_clipping"] == 0.0


def test_launch_config_writes_the_accelerate_and_deepspeed_files(compose_config, tmp_path, capsys):
    pytest.importorskip("deepspeed")
    import yaml
    from accelerate.commands.config.config_args import load_config_from_file

    from medsft.cli import main
    from medsft.runtime.deepspeed import deepspeed_json

    overrides = ["deepspeed=zero3_8gpu", "launcher.num_processes=8", "data.path=x.json"]
    assert main(["launch-config", *overrides, "--out", str(tmp_path / "lc")]) == 0
    printed = capsys.readouterr().out
    acc_file, ds_file = tmp_path / "lc" / "accelerate_config.yaml", tmp_path / "lc" / "deepspeed_config.json"
    assert str(acc_file) in printed and "accelerate launch --config_file" in printed
    loaded = load_config_from_file(str(acc_file))  # accelerate's own loader: a valid accelerate config
    assert str(loaded.distributed_type).endswith("DEEPSPEED") and loaded.num_processes == 8
    assert loaded.deepspeed_config["deepspeed_config_file"] == str(ds_file.resolve())
    assert loaded.deepspeed_config["zero3_init_flag"] is True
    # The JSON is the generated one (auto precision = bf16: the files are for GPU machines), of conf/'s defaults:
    # without experiment= the CPU demo preset (batch 4 x accumulation 1, lr 5e-4) never applies silently.
    ds = json.loads(ds_file.read_text())
    assert ds == deepspeed_json(compose_config("~experiment", *overrides), "bf16", world_size=8)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (2, 8)  # the seed's
    assert "config: no experiment preset: conf/'s defaults, the seed's values; lr 5e-06" in printed
    assert f"launch.py ~experiment {' '.join(overrides)}" in printed  # the launch composes the same config

    # A named preset applies, and is said.
    assert main(["launch-config", "experiment=medical_o1_spanish_8gpu", "data.path=x.json",
                 "--out", str(tmp_path / "named")]) == 0
    printed = capsys.readouterr().out
    assert "config: experiment=medical_o1_spanish_8gpu; lr 5e-06, 2 per device x 8 accumulation x 8 processes" in printed
    assert "launch.py experiment=medical_o1_spanish_8gpu data.path=x.json" in printed
    assert main(["launch-config", "experiment=demo", "data.path=x.json", "--out", str(tmp_path / "demo")]) == 0
    assert "config: experiment=demo; lr 0.0005, 4 per device x 1 accumulation" in capsys.readouterr().out

    assert main(["launch-config", "launcher=cpu_2proc", "data.path=x.json", "--out", str(tmp_path / "ddp")]) == 0
    plain = yaml.safe_load((tmp_path / "ddp" / "accelerate_config.yaml").read_text())
    assert plain["distributed_type"] == "MULTI_GPU" and plain["num_processes"] == 2 and plain["mixed_precision"] == "no"
    assert not (tmp_path / "ddp" / "deepspeed_config.json").exists()


# ------------------------------------------------------------------------------------------ the relaunch


def test_when_to_relaunch_and_when_to_run_in_place(compose_config):
    from medsft.runtime.relaunch import needs_relaunch

    two = compose_config(*["launcher=cpu_2proc", "data.path=x.json"])
    one = compose_config(*["data.path=x.json"])
    assert needs_relaunch(two, {}) and not needs_relaunch(one, {})
    assert needs_relaunch(compose_config(*["launcher=multi_node", "data.path=x.json"]), {})
    for inside in ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"},  # torchrun / accelerate --multi_gpu
                   {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_DYNAMO_BACKEND": "no"},  # accelerate, 1 proc
                   {"SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1"},  # srun, one task per process
                   {"MEDSFT_LAUNCH_DIR": "/tmp/x"}):  # our own child
        assert not needs_relaunch(two, inside), inside
    # A SLURM task per machine (submitit, the sbatch example) or the batch script itself (it sees the
    # allocation's SLURM_NTASKS but is one process) is not a distributed job yet: relaunch.
    assert needs_relaunch(two, {"SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0", "SLURM_JOB_ID": "77"})
    assert needs_relaunch(two, {"SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_JOB_ID": "77"})


@pytest.fixture
def hydra_context():
    """A HydraConfig as `python launch.py launcher=cpu_2proc ...` would have it (restored afterwards)."""
    from hydra.core.hydra_config import HydraConfig

    from medsft.config import compose

    def make(*overrides: str, run_dir: Path):
        full = compose(overrides, return_hydra_config=True)
        with open_dict(full):
            full.hydra.runtime.output_dir = str(run_dir)
        HydraConfig.instance().set_config(full)
        cfg = OmegaConf.masked_copy(full, [k for k in full if k != "hydra"])
        OmegaConf.set_struct(cfg, True)
        return cfg

    saved = HydraConfig.instance().cfg
    yield make
    HydraConfig.instance().cfg = saved


def test_relaunch_command_environment_ports_objective_and_exit_code(tmp_path, monkeypatch, hydra_context):
    from medsft.runtime import cluster
    from medsft.runtime import relaunch as launcher

    calls = []

    def fake_child(argv, env, cwd):
        calls.append((argv, env, cwd))
        launch_dir = Path(env[launcher.LAUNCH_DIR_ENV])
        expected = json.loads((launch_dir / launcher.CONFIG_FILE).read_text())  # what the child must compose
        assert expected["launcher"]["num_processes"] == (1 if "deepspeed=zero2_local" in argv else 2)
        if "data.max_samples=5" in argv:  # the failing job: rank 1 reports a DataError (3), torchrun says 1
            (launch_dir / "rank1.exit").write_text("3")
            return 1
        (tmp_path / "run" / "metrics.jsonl").write_text(json.dumps({"kind": "summary", "objective": 1.25}) + "\n")
        return 0

    monkeypatch.setattr(launcher, "run_child", fake_child)
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "SLURM_STEP_NUM_TASKS", launcher.LAUNCH_DIR_ENV,
                 "ACCELERATE_USE_CPU", "ACCELERATE_MIXED_PRECISION", "ACCELERATE_DYNAMO_BACKEND", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    overrides = ("launcher=cpu_2proc", "model=tiny_random", "optimizer.learning_rate=1e-5")
    cfg = hydra_context(*overrides, run_dir=tmp_path / "run")
    assert launcher.maybe_relaunch(cfg, tmp_path / "run") == (True, 1.25)
    assert launcher.maybe_relaunch(cfg, tmp_path / "run") == (True, 1.25)  # a second multirun job
    (argv, env, cwd), (argv2, _, _) = calls
    joined = " ".join(argv)
    assert argv[1:3] == ["-m", "accelerate.commands.launch"] and "--multi_gpu" in argv and "--cpu" not in argv
    assert argv[argv.index("--num_processes") + 1] == "2" and env["ACCELERATE_USE_CPU"] == "1"
    assert argv[argv.index("--module") + 1: argv.index("--module") + 3] == ["medsft.cli", "train"]
    for override in overrides:
        assert override in argv
    assert f"hydra.run.dir={(tmp_path / 'run').resolve()}" in argv and f"--config-path={CONF}" in joined
    assert cwd == Path(os.getcwd())
    port, port2 = (int(a[a.index("--main_process_port") + 1]) for a in (argv, argv2))
    assert port != port2 and port > 0  # each job its own free rendezvous port
    assert not Path(env[launcher.LAUNCH_DIR_ENV]).exists()  # cleaned up

    # DeepSpeed: no ACCELERATE_USE_CPU (it would silently drop DeepSpeed); the Accelerator picks gloo itself.
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    ds_cfg = hydra_context(*overrides, "deepspeed=zero3", run_dir=tmp_path / "run")
    launcher.maybe_relaunch(ds_cfg, tmp_path / "run")
    assert "ACCELERATE_USE_CPU" not in calls[-1][1]
    # One DeepSpeed process (zero2_local) still needs a process group: torchrun with one process.
    single = hydra_context("model=tiny_random", "deepspeed=zero2_local", run_dir=tmp_path / "run")
    assert launcher.needs_relaunch(single)
    launcher.maybe_relaunch(single, tmp_path / "run")
    assert calls[-1][0][1:3] == ["-m", "torch.distributed.run"] and "--nproc_per_node" in calls[-1][0]

    failing = hydra_context(*overrides, "data.max_samples=5", run_dir=tmp_path / "run")
    with pytest.raises(launcher.DistributedJobFailed) as info:
        launcher.maybe_relaunch(failing, tmp_path / "run")
    assert info.value.exit_code == 3


def test_the_child_refuses_a_config_different_from_the_parents(compose_config, tmp_path, monkeypatch):
    from medsft.runtime import cluster
    from medsft.runtime import relaunch as launcher

    parent = compose_config(*["launcher=cpu_2proc", "data.path=x.json"])
    (tmp_path / launcher.CONFIG_FILE).write_text(json.dumps(launcher._config_snapshot(parent)))
    monkeypatch.setenv(launcher.LAUNCH_DIR_ENV, str(tmp_path))
    launcher.check_child_config(parent)  # same: fine
    with pytest.raises(ConfigError, match="optimizer.learning_rate"):
        launcher.check_child_config(compose_config(*["launcher=cpu_2proc", "data.path=x.json",
                                                 "optimizer.learning_rate=1"]))
    monkeypatch.setenv("RANK", "1")
    launcher.record_exit(5)
    assert (tmp_path / "rank1.exit").read_text() == "5"


def test_multi_node_rendezvous_and_slurm_in_place(compose_config):
    from medsft.runtime import cluster
    from medsft.runtime import relaunch as launcher

    cfg = compose_config(*["launcher=multi_node", "data.path=x.json"])
    slurm = {"SLURM_JOB_ID": "123456", "SLURM_NNODES": "2", "SLURM_NODEID": "1", "MASTER_ADDR": "node-a"}
    rdzv = cluster.rendezvous(cfg, slurm)
    assert rdzv == {"machine_rank": 1, "main_process_ip": "node-a", "main_process_port": 20000 + 123456 % 20000}
    assert cluster.rendezvous(cfg, {**slurm, "SLURM_NODEID": "0"})["main_process_port"] == rdzv["main_process_port"]
    with pytest.raises(ConfigError, match="main_process_ip"):
        cluster.rendezvous(cfg, {})
    with pytest.raises(ConfigError, match="main_process_port"):
        cluster.rendezvous(compose_config(*["launcher=multi_node", "data.path=x.json", "launcher.main_process_ip=h"]), {})
    argv = launcher.accelerate_command(cfg, ["x=1"], rdzv, Path("acc.yaml"))
    for flag, value in (("--num_machines", "2"), ("--machine_rank", "1"), ("--main_process_ip", "node-a"),
                        ("--num_processes", "16"), ("--rdzv_backend", "static")):
        assert argv[argv.index(flag) + 1] == value
    with pytest.raises(ConfigError, match="divide"):
        cluster.check_launcher(compose_config(*["launcher=multi_node", "launcher.num_processes=9", "data.path=x.json"]))

    per_process = compose_config(*["launcher=cpu_2proc", "data.path=x.json", "launcher.main_process_port=29999"])
    env = {"SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_STEP_TASKS_PER_NODE": "2"}
    cluster.adopt_slurm_env(per_process, env)
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"], env["MASTER_PORT"]) == ("1", "1", "2", "29999")


def test_zero3_partitioned_matrices_keep_weight_decay():
    from medsft.train.optim import is_no_decay

    partitioned = torch.nn.Parameter(torch.empty(0))  # what zero.Init leaves in the module
    partitioned.ds_shape = torch.Size([128, 64])
    assert not is_no_decay("model.layers.0.mlp.up_proj.weight", partitioned)


def test_the_parent_builds_a_local_model_source_before_the_workers_start(tmp_path, monkeypatch, hydra_context):
    """transformers writes a model's weights only on rank 0 of a process group: a tiny-random (or embedded) model
    built by whichever worker took the cache lock first could be cached without weights. The relaunching parent
    builds it before any worker exists."""
    from medsft.runtime import relaunch as launcher

    cache = tmp_path / "cache"
    built = []

    def fake_child(argv, env, cwd):
        built.append(sorted(p.name for p in cache.rglob("*") if p.is_file()))
        return 1

    monkeypatch.setattr(launcher, "run_child", fake_child)
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "SLURM_STEP_NUM_TASKS", launcher.LAUNCH_DIR_ENV,
                 "ACCELERATE_MIXED_PRECISION", "ACCELERATE_DYNAMO_BACKEND", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    cfg = hydra_context("launcher=cpu_2proc", "model=tiny_random", f"model.cache_dir={cache}", run_dir=tmp_path / "run")
    with pytest.raises(launcher.DistributedJobFailed):
        launcher.maybe_relaunch(cfg, tmp_path / "run")
    assert built and {"config.json", "model.safetensors", "tokenizer.json"} <= set(built[0]), built
