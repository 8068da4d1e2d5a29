"""FSDP2 (`fsdp=full_shard | shard_grad_op | full_shard_offload`), the second sharding engine beside DeepSpeed:
the plugin and the accelerate file built from the config, the start-up refusals, and real 2-process gloo runs
through launch.py's relaunch on the tiny random model.

    full_shard run      2 processes x bsz 2 x accumulation 2, test_distributed.py's recipe (NaN at step 3), with
                        transformers' gradient checkpointing and the chunked loss (the demo preset's):
                        LR identical at every step and step-1 loss/grad norm within 1e-6/1e-5 of ONE process
                        with the same global batch; both ranks stepped and end with identical gathered weights;
                        the weight-decay group holds matrices only; the checkpoint's full weights reload with
                        plain from_pretrained here with the job's logits; its training state is a
                        torch.distributed.checkpoint of model + optimizer; the generation check and a
                        checkpoint eval run on the sharded model (every process generating in lockstep)
    resume              shard_grad_op + packing + chunked loss + FSDP activation checkpointing, attention
                        dropout: SIGKILL inside step 5, resume -> every loss and the final weights bitwise
                        equal to an uninterrupted run; another world size is refused
    benchmark           benchmarks/distributed.py --smoke (DDP and FSDP2 side by side)
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medsft.config import validate
from medsft.errors import ConfigError
from medsft.resume_policy import refuse_inexact
from medsft.testing.faults import ENV as FAULTS
from medsft.train import checkpoint as ckpt
from medsft.train.resume import exactness_differences
from test_distributed import (NAN_STEP, RECIPE, RUN_TIMEOUT_S, TOTAL_STEPS, _check_run_against_reference, _dump,
                              _records, assert_reloads_to_the_jobs_logits, reference)  # noqa: F401 - `reference` is a fixture used below
from train_utils import ROOT, compose_cfg, launch, tiny_overrides

SHARED_EVAL = ROOT / "tests" / "fixtures" / "eval" / "headqa_mini"


# ------------------------------------------------------------------------------------------ config and plugin


@pytest.fixture
def fsdp_env(monkeypatch):
    """accelerate's FSDP plugin writes FSDP_CPU_RAM_EFFICIENT_LOADING into os.environ: restored afterwards."""
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "False")
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)


@pytest.mark.parametrize("preset,reshard,offload", [("full_shard", True, False), ("shard_grad_op", False, False),
                                                    ("full_shard_offload", True, True)])
def test_the_plugin_comes_from_the_fsdp_group(compose_config, fsdp_env, preset, reshard, offload):
    from torch.distributed.fsdp import CPUOffloadPolicy
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    from medsft.runtime.fsdp import build_fsdp_plugin

    cfg = compose_config(f"fsdp={preset}", "data.path=x.json", "fsdp.activation_checkpointing=true")
    validate(cfg)
    plugin = build_fsdp_plugin(cfg, "no", cpu=False)
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is reshard
    assert isinstance(plugin.cpu_offload, CPUOffloadPolicy) is offload
    assert plugin.auto_wrap_policy is transformer_auto_wrap_policy and plugin.transformer_cls_names_to_wrap is None
    assert plugin.activation_checkpointing is True and plugin.cpu_ram_efficient_loading is True
    assert str(plugin.state_dict_type).endswith("SHARDED_STATE_DICT")  # save_state: torch.distributed.checkpoint
    assert plugin.mixed_precision_policy is None  # fp32

    bf16 = build_fsdp_plugin(cfg, "bf16", cpu=False).mixed_precision_policy
    assert (bf16.param_dtype, bf16.reduce_dtype) == (torch.bfloat16, torch.bfloat16)
    cfg.fsdp.reduce_dtype = "float32"
    exact = build_fsdp_plugin(cfg, "bf16", cpu=False).mixed_precision_policy
    assert (exact.param_dtype, exact.reduce_dtype) == (torch.bfloat16, torch.float32)
    cfg.fsdp.wrap_layers = ["LlamaDecoderLayer"]
    assert build_fsdp_plugin(cfg, "no", cpu=False).transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]


def test_cpu_offload_on_the_cpu_is_refused(compose_config, fsdp_env):
    from medsft.runtime.fsdp import build_fsdp_plugin

    with pytest.raises(ConfigError, match="fsdp.cpu_offload=true needs GPUs"):
        build_fsdp_plugin(compose_config("fsdp=full_shard_offload", "data.path=x.json"), "no", cpu=True)


@pytest.mark.parametrize("overrides,expected", [
    (["deepspeed=zero3", "fsdp=full_shard"], "deepspeed=zero3 and fsdp=full_shard are two sharding engines"),
    (["fsdp=shard_grad_op", "fsdp.activation_checkpointing=true", "model.gradient_checkpointing=true"],
     "both recompute activations"),
    (["fsdp=full_shard", "fsdp.sharding=zero3"], "fsdp.sharding='zero3' is not one of ['full_shard', 'shard_grad_op']"),
    (["fsdp=full_shard", "fsdp.reduce_dtype=fp8"], "fsdp.reduce_dtype='fp8' is not one of"),
    (["fsdp=full_shard", "fsdp.wrap_layers=[]"], "fsdp.wrap_layers=[] names no class"),
    (["fsdp=full_shard", "stage=rl", "rl=grpo"], "fsdp=full_shard applies to the SFT stage"),
])
def test_what_cannot_work_is_refused_at_start_up(compose_config, overrides, expected):
    with pytest.raises(ConfigError) as info:
        validate(compose_config(*overrides, "data.path=x.json"))
    assert expected in str(info.value)
    validate(compose_config("deepspeed=zero3", "fsdp=none", "data.path=x.json"))  # one engine: fine


def test_choosing_deepspeed_and_fsdp_fails_before_anything_is_loaded(tmp_path):
    result = launch("deepspeed=zero3", "fsdp=full_shard", "model.path=/nonexistent/never/loaded",
                    f"hydra.run.dir={tmp_path / 'run'}", timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "two sharding engines" in result.stderr and "Traceback" not in result.stderr
    assert "starting" not in result.stderr + result.stdout  # refused before any process was started


def test_the_wrap_classes_are_checked_on_the_model(compose_config, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from medsft.runtime.fsdp import wrap_layer_classes

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    fsdp = compose_config("fsdp=full_shard", "data.path=x.json").fsdp
    assert wrap_layer_classes(model, fsdp) == ["LlamaDecoderLayer"]  # the model's _no_split_modules
    fsdp.wrap_layers = ["QwenBlock"]
    with pytest.raises(ConfigError, match=r"fsdp.wrap_layers names \['QwenBlock'\].*LlamaDecoderLayer"):
        wrap_layer_classes(model, fsdp)
    model._no_split_modules = None
    fsdp.wrap_layers = None
    with pytest.raises(ConfigError, match="declares no decoder layer classes"):
        wrap_layer_classes(model, fsdp)


def test_an_accelerate_fsdp_launch_with_fsdp_none_is_refused(compose_config, monkeypatch):
    from medsft.runtime.accelerator import build_accelerator

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` with an FSDP config sets
    with pytest.raises(ConfigError, match="fsdp=none: pass the matching preset"):
        build_accelerator(compose_config("model=tiny_random", "data.path=x.json"))


def test_fsdp_relaunches_even_one_process_and_keeps_gloo_on_cpu(compose_config, tmp_path):
    from medsft.runtime.relaunch import child_env, needs_relaunch

    one = compose_config("fsdp=full_shard", "data.path=x.json")
    assert needs_relaunch(one, {}) and not needs_relaunch(compose_config("data.path=x.json"), {})
    env = child_env(compose_config("fsdp=full_shard", "launcher=cpu_2proc", "data.path=x.json"), tmp_path, {})
    # ACCELERATE_USE_CPU: gloo processes (FSDP is switched on by medsft); no GPU may host the device mesh.
    assert env["ACCELERATE_USE_CPU"] == "1" and env["CUDA_VISIBLE_DEVICES"] == ""


def test_launch_config_writes_an_fsdp_file_that_accelerate_reads_as_the_same_plugin(compose_config, tmp_path,
                                                                                     monkeypatch, capsys):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    from medsft.cli import main
    from medsft.runtime.fsdp import build_fsdp_plugin

    overrides = ["fsdp=shard_grad_op", "fsdp.activation_checkpointing=true", "launcher.num_processes=8",
                 "data.path=x.json"]
    assert main(["launch-config", *overrides, "--out", str(tmp_path / "lc")]) == 0
    assert "accelerate launch --config_file" in capsys.readouterr().out
    acc_file = tmp_path / "lc" / "accelerate_config.yaml"
    assert not (tmp_path / "lc" / "deepspeed_config.json").exists()
    args = launch_command_parser().parse_args(["--config_file", str(acc_file), "launch.py"])
    args, _, _ = _validate_launch_command(args)  # accelerate's own reading of the file
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    assert args.num_processes == 8
    for key in [k for k in os.environ if k.startswith("FSDP_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith("FSDP_"):
            monkeypatch.setenv(key, value)
    from_file = FullyShardedDataParallelPlugin()  # every value from the launcher's FSDP_* variables
    ours = build_fsdp_plugin(compose_config(*overrides), "bf16", cpu=False)
    for field in ("fsdp_version", "reshard_after_forward", "auto_wrap_policy", "activation_checkpointing",
                  "cpu_ram_efficient_loading", "state_dict_type"):
        assert getattr(from_file, field) == getattr(ours, field), field
    assert type(from_file.cpu_offload) is type(ours.cpu_offload)


# ------------------------------------------------------------------------------------------ 2-process runs


def _shared_eval_dir(tmp: Path) -> Path:
    """$MEDSFT_SHARED_DATA for conf/eval/headqa_es: the 5-question HEAD-QA fixture under that preset's name."""
    shared = tmp / "shared"
    shared.mkdir()
    (shared / "headqa_es").symlink_to(SHARED_EVAL, target_is_directory=True)
    return shared


@pytest.fixture(scope="module")
def full_shard(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    env = {**os.environ, "MEDSFT_DEBUG_DUMP": str(tmp / "dump"), FAULTS: f"nan_at_steps={NAN_STEP}",
           "MEDSFT_SHARED_DATA": str(_shared_eval_dir(tmp))}
    result = launch(*tiny_overrides(tmp), *RECIPE, "launcher=cpu_2proc", "train.train_bsz_per_gpu=2",
                    "fsdp=full_shard", "model.gradient_checkpointing=true", "generation_check.enabled=true",
                    "generation_check.num_questions=2",
                    "generation_check.max_new_tokens=8", "checkpoint.eval_benchmark=headqa_es",
                    "checkpoint.eval_limit=3", "checkpoint.eval_max_new_tokens=4", f"hydra.run.dir={tmp / 'run'}",
                    env=env, timeout=RUN_TIMEOUT_S)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    assert "terminate called" not in output and "Aborted" not in output
    return {"dir": tmp, "run": tmp / "run", "out": output, "dump": _dump(tmp / "dump"),
            "train": _records(tmp / "run", "train"), "summary": _records(tmp / "run", "summary")[-1]}


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp_full_shard_matches_one_process_and_both_ranks_end_equal(full_shard, reference):
    _check_run_against_reference(full_shard, reference)  # LR, samples, step 1 loss/grad norm, NaN skip, weights
    assert "FSDP2 full_shard: 6 sharded modules (LlamaDecoderLayer each" in full_shard["out"]
    for rank, dump in full_shard["dump"].items():
        assert dump["fsdp"] == {"units": 6, "distributed_type": "DistributedType.FSDP"}, rank
        assert dump["loss_scale"] == 4.0  # world 2 x accumulation 2, as DDP: FSDP2 averages over processes
        # Weight decay on matrices only, in groups FSDP2 kept apart: every tensor a DTensor shard of its own.
        decay, no_decay = dump["param_groups"]
        assert (decay["weight_decay"], decay["ndims"]) == (0.1, [2])
        assert (no_decay["weight_decay"], no_decay["ndims"]) == (0.0, [1])
        assert decay["dtensors"] == decay["tensors"] and no_decay["dtensors"] == no_decay["tensors"] == 5
        assert dump["num_parameters"] == reference["dump"]["num_parameters"]


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp_checkpoint_holds_full_weights_that_reload_and_a_sharded_training_state(full_shard):

    latest = ckpt.latest_complete_checkpoint(full_shard["dir"] / "ckpts" / "tiny")
    assert latest is not None and latest.name.endswith(f"-{TOTAL_STEPS}")
    weights = load_file(latest / "model.safetensors")
    assert sum(t.numel() for t in weights.values()) == full_shard["dump"][0]["num_parameters"]
    assert json.loads((latest / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    # The exact-resume state: torch.distributed.checkpoint shards of both ranks, model and optimizer.
    state = latest / ckpt.TRAINING_STATE_DIR
    for folder in ("pytorch_model_fsdp_0", "optimizer_0"):
        assert sorted(p.name for p in (state / folder).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"], folder
    assert not (state / "model.safetensors").exists()

    # A fresh process (this one) reloads it with plain from_pretrained: the job's logits.
    assert_reloads_to_the_jobs_logits(full_shard["dir"], latest)


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp_generation_check_and_checkpoint_eval_run_on_the_sharded_model(full_shard):
    generations = _records(full_shard["run"], "generation")
    assert [(g["when"], g["n_questions"]) for g in generations] == [("before", 2), ("after", 2)]
    answers = (full_shard["run"] / "generations_after.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(answers) == 2
    evals = _records(full_shard["run"], "checkpoint_eval")
    # The fixture's 3 questions, one of which needs an image (skipped, as HEAD-QA's are by default).
    assert [(e["step"], e["benchmark"], e["n"]) for e in evals] == [(TOTAL_STEPS, "headqa_es", 2)]
    assert 0.0 <= evals[0]["accuracy"] <= 1.0


# ------------------------------------------------------------------------------------------ kill -9 and resume


RESUME_RECIPE = ("launcher=cpu_2proc", "train.train_bsz_per_gpu=2", "train.gradient_accumulation_steps=2",
                 "train.max_steps=6", "checkpoint.every_n_steps=2", "checkpoint.max_ckpts=1",
                 "checkpoint.save_at_epoch_end=false", "data.val_ratio=0", "data.max_seq_len=256",
                 "data.overlong=truncate", "fsdp=shard_grad_op", "fsdp.activation_checkpointing=true",
                 "data.packing=true", "model.chunked_loss=true")


def _dropout_model(tmp: Path, tiny_model_dir: str) -> Path:
    """The tiny random Llama with attention_dropout=0.1: every step consumes each process's torch RNG."""
    import shutil

    path = tmp / "tiny-dropout"
    shutil.copytree(tiny_model_dir, path)
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    config["attention_dropout"] = 0.1
    (path / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return path


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _records(run_dir, "train")}


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp_sigkill_then_resume_is_bitwise_exact_and_another_world_size_is_refused(tmp_path, tiny_model_dir):
    model = _dropout_model(tmp_path, tiny_model_dir)

    def run(where: Path, name: str, *extra: str, faults: str | None = None) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k != FAULTS}
        if faults:
            env[FAULTS] = faults
        return subprocess.run([sys.executable, str(ROOT / "launch.py"), *tiny_overrides(where), f"model.path={model}",
                               *RESUME_RECIPE, *extra, f"hydra.run.dir={where / name}"], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=RUN_TIMEOUT_S)

    ref_tmp, tmp = tmp_path / "uninterrupted", tmp_path / "killed"
    ref = run(ref_tmp, "run")
    assert ref.returncode == 0, ref.stderr[-4000:]
    log = ref.stdout + ref.stderr
    assert "FSDP2 shard_grad_op" in log and "activation checkpointing" in log and "chunked linear cross-entropy" in log
    killed = run(tmp, "a", faults="kill_mid_step=5")
    assert killed.returncode != 0
    root = tmp / "ckpts" / "tiny"
    assert [p.name for p in ckpt.list_complete_checkpoints(root)] == ["checkpoint-0-4"]

    # The same job on one process would be refused before loading anything (the sharded state is per process).
    path = ckpt.latest_complete_checkpoint(root)
    saved = ckpt.read_trainer_state(path)
    cfg = compose_cfg([*tiny_overrides(tmp), f"model.path={model}", *RESUME_RECIPE, "launcher.num_processes=1"])
    differences = exactness_differences(path, saved, {**saved["fingerprint"], "world_size": 1}, cfg)
    assert differences == ["world_size: checkpoint 2 != now 1"]
    with pytest.raises(ConfigError, match="cannot resume exactly"):
        refuse_inexact(path, differences, cfg.resume)

    resumed = run(tmp, "b")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed from" in resumed.stdout + resumed.stderr

    expected = _losses(ref_tmp / "run")
    got = {**_losses(tmp / "a"), **_losses(tmp / "b")}
    assert sorted(expected) == sorted(got) == list(range(1, 7)) and min(_losses(tmp / "b")) == 5
    assert got == expected  # bitwise: the same floats at every step
    assert all(math.isfinite(loss) for loss in got.values())
    ref_w = load_file(ckpt.latest_complete_checkpoint(ref_tmp / "ckpts" / "tiny") / "model.safetensors")
    got_w = load_file(ckpt.latest_complete_checkpoint(root) / "model.safetensors")
    assert ref_w.keys() == got_w.keys()
    assert [k for k in ref_w if not torch.equal(ref_w[k], got_w[k])] == []


# ------------------------------------------------------------------------------------------ the benchmark


@pytest.mark.slow
@pytest.mark.distributed
def test_the_distributed_benchmark_smoke_run(tmp_path):
    """benchmarks/distributed.py --smoke: DDP and FSDP2 jobs of the tiny model, side by side, through launch.py."""
    out = tmp_path / "lines.jsonl"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "distributed.py"), "--smoke", "--work-dir",
                           str(tmp_path / "work"), "--json-out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=2 * RUN_TIMEOUT_S)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    rows = {row["engine"]: row for row in lines if row["bench"] == "distributed"}
    assert sorted(rows) == ["ddp", "fsdp2"] and all(row["ok"] for row in rows.values())
    assert rows["ddp"]["vs_ddp_best"] == 1.0 and rows["fsdp2"]["vs_ddp_best"] > 0
    for row in rows.values():
        assert row["steps_timed"] == 2 and row["tokens_timed"] > 0 and row["tokens_per_s_best"] > 0
        assert len(row["peak_rss_mib_ranks"]) == 2 and min(row["peak_rss_mib_ranks"]) > 100  # torch alone is more
    # The same work: step 1 of both engines sees the same examples and initial weights.
    assert rows["fsdp2"]["loss_step1"] == pytest.approx(rows["ddp"]["loss_step1"], rel=1e-6)
    assert "tiny     fsdp2" in done.stdout
