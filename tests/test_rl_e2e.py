"""RL end to end on tiny-random: GRPO and PPO through `python launch.py stage=rl ...` (checkpoints reloaded with
AutoModelForCausalLM), resume, and a toy verifiable task on which GRPO's mean reward rises (the loop learns)."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medsft.errors import ConfigError
from medsft.outputs import read_records as read_jsonl

FIX = Path(__file__).parent / "fixtures" / "rl"
sys.path.insert(0, str(FIX))

from rl_helpers import build_tiny_verifier  # noqa: E402
from train_utils import compose_cfg, reset_accelerate  # noqa: E402

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def _common(tmp_path: Path, models_cache_dir: Path, name: str) -> list[str]:
    return [
        "stage=rl",
        "model=tiny_random",
        "train.mixed_precision=no",  # fp32 whatever the CPU (auto = bf16 on a CPU with native bf16 units)
        f"model.cache_dir={models_cache_dir}",
        f"output_dir={tmp_path / 'ckpts'}",
        f"log_dir={tmp_path / 'logs'}",
        f"experiment_name={name}",
        "logging.progress_bar=false",
        "rl.max_completion_length=12",
        "rl.samples_every_n_steps=1",
        "rl.samples_per_write=2",
    ]


def _launch(tmp_path: Path, overrides: list[str], run_dir: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(FIX))
    cmd = [sys.executable, "launch.py", *overrides, f"hydra.run.dir={run_dir}"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done


def _reload_and_generate(path: Path) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medsft.data.render import prompt_ids

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    ids = torch.tensor([prompt_ids(tokenizer, "¿Cuál es el antídoto del paracetamol?")])
    out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > ids.shape[1]
    return tokenizer.decode(out[0, ids.shape[1]:])


def test_grpo_end_to_end_checkpoints_metrics_samples_wandb(tmp_path, models_cache_dir, tiny_model_dir):
    run_dir = tmp_path / "run"
    _launch(tmp_path, [
        *_common(tmp_path, models_cache_dir, "grpo_e2e"), "rl=grpo", "logging=wandb_offline",
        "rl.max_steps=2", "rl.num_generations=2", "rl.per_device_batch_size=4", "rl.gradient_accumulation_steps=1",
        "rl.data.eval_ratio=0.12", "rl.eval_every_n_steps=2", "checkpoint.every_n_steps=1", "checkpoint.max_ckpts=1",
    ], run_dir)  # fmt: skip
    out = tmp_path / "ckpts" / "grpo_e2e" / "rl_grpo"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]  # max_ckpts=1 rotated checkpoint-1
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    for folder in (out / "checkpoint-2", out / "final"):
        _reload_and_generate(folder)
    rows = read_jsonl(run_dir / "metrics.jsonl")
    train = [r for r in rows if "reward" in r]
    assert [r["step"] for r in train] == [1, 2]
    for key in ("rewards/format/mean", "rewards/format/std", "rewards/rule/mean", "rewards/rule/std",
                "format/failure_rate", "reward", "reward_std", "kl", "entropy", "completions/mean_length",
                "clip_ratio/region_mean", "tokens_per_s", "learning_rate", "grad_norm"):  # fmt: skip
        assert key in train[-1], key
    assert train[0]["format/failure_rate"] == 1.0 - train[0]["rewards/format/mean"]  # random model: no layout
    assert any(r["kind"] == "eval" and "eval_reward" in r and "eval_format/failure_rate" in r for r in rows)
    assert (run_dir / "rl_curves.png").stat().st_size > 0
    samples = sorted((run_dir / "samples").glob("step_*.jsonl"))
    assert [p.name for p in samples] == ["step_000000.jsonl", "step_000001.jsonl"]
    sample = read_jsonl(samples[0])[0]
    assert set(sample) >= {"question", "reference", "completion", "format_ok", "rewards"}
    assert set(sample["rewards"]) == {"format", "rule"}
    summary = json.loads((run_dir / "rl_summary.json").read_text())
    assert summary["global_step"] == 2 and summary["final"].endswith("final")
    assert list((tmp_path / "logs" / "grpo_e2e" / "wandb").glob("offline-run-*")), "wandb offline run missing"


def test_ppo_end_to_end_with_model_verifier_value_model_in_checkpoints(tmp_path, models_cache_dir, tiny_model_dir):
    verifier = build_tiny_verifier(tiny_model_dir, tmp_path / "verifier")
    run_dir = tmp_path / "run"
    _launch(tmp_path, [
        *_common(tmp_path, models_cache_dir, "ppo_e2e"), "rl=ppo", "logging=none", f"rl.verifier.path={verifier}",
        "rl.max_steps=2", "rl.per_device_batch_size=2", "rl.gradient_accumulation_steps=1", "rl.num_iterations=2",
        "rl.learning_rate=1e-4", "checkpoint.every_n_steps=1", "checkpoint.max_ckpts=2",
    ], run_dir)  # fmt: skip
    out = tmp_path / "ckpts" / "ppo_e2e" / "rl_ppo"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    ckpt = out / "checkpoint-2"
    assert (ckpt / "value_model" / "config.json").is_file() and (ckpt / "value_optimizer.pt").is_file()
    _reload_and_generate(ckpt)
    _reload_and_generate(out / "final")
    from transformers import AutoModelForSequenceClassification

    value = AutoModelForSequenceClassification.from_pretrained(ckpt / "value_model")
    assert value.config.num_labels == 1
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    first = rows[0]
    for key in ("rewards/model_verifier/mean", "rewards/model_verifier/std", "format/failure_rate", "kl",
                "ppo/kl_seq", "ppo/score_mean", "ppo/value_mean", "ppo/returns_mean", "ppo/vf_loss",
                "ppo/vf_clipfrac", "clip_ratio/region_mean", "entropy", "completions/mean_length",
                "tokens_per_s"):  # fmt: skip
        assert key in first, key
    assert first["rewards/model_verifier/mean"] == 0.0  # a random policy never writes the layout: reward 0
    assert "ppo/vf_loss" in rows[1] and "clip_ratio/region_mean" in rows[1]  # 2nd PPO epoch on the same rollouts
    assert read_jsonl(sorted((run_dir / "samples").glob("step_*.jsonl"))[0])[0]["rewards"] == {"model_verifier": 0.0}
    # The critic trains: its weights move between the two checkpoints.
    v1, v2 = (_value_state(out / f"checkpoint-{n}") for n in (1, 2))
    assert any(not torch.equal(v1[k], v2[k]) for k in v1)
    # Resume restores the critic: with a ~0 value learning rate, checkpoint-3's critic is checkpoint-2's.
    base = [*_common(tmp_path, models_cache_dir, "ppo_e2e"), "rl=ppo", "logging=none", f"rl.verifier.path={verifier}",
            "rl.per_device_batch_size=2", "rl.gradient_accumulation_steps=1", "rl.num_iterations=2",
            "rl.learning_rate=1e-4", "checkpoint.every_n_steps=1", "checkpoint.max_ckpts=2",
            "rl.samples_every_n_steps=0"]  # fmt: skip
    with pytest.raises(ConfigError, match="rl.ppo.value_learning_rate"):
        _run([*base, "rl.max_steps=3", "rl.ppo.value_learning_rate=1e-12"], tmp_path / "run2")
    _run([*base, "rl.max_steps=3", "rl.ppo.value_learning_rate=1e-12", "resume.allow_config_change=true"],
         tmp_path / "run2")  # fmt: skip
    v3 = _value_state(out / "checkpoint-3")
    assert all(torch.allclose(v2[k], v3[k], atol=1e-6) for k in v2)
    assert [r["step"] for r in read_jsonl(tmp_path / "run2" / "metrics.jsonl") if "loss" in r] == [3]


def _value_state(checkpoint: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(checkpoint / "value_model" / "model.safetensors"))


# ----------------------------------------------------------------------------------------- in-process runs


def _run(overrides: list[str], run_dir: Path):
    from medsft.run import run

    reset_accelerate()
    run_dir.mkdir(parents=True, exist_ok=True)
    return run(compose_cfg(overrides), run_dir)


def test_grpo_resume_continues_from_the_newest_checkpoint(tmp_path, models_cache_dir, tiny_model_dir):
    base = [*_common(tmp_path, models_cache_dir, "resume"), "rl=grpo", "logging=none", "rl.num_generations=2",
            "rl.per_device_batch_size=2", "rl.gradient_accumulation_steps=1", "rl.max_completion_length=8",
            "checkpoint.every_n_steps=1", "checkpoint.max_ckpts=2", "checkpoint.save_final=false",
            "rl.samples_every_n_steps=0"]  # fmt: skip
    _run([*base, "rl.max_steps=2"], tmp_path / "run1")
    out = tmp_path / "ckpts" / "resume" / "rl_grpo"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    _run([*base, "rl.max_steps=3"], tmp_path / "run2")  # resume.from_checkpoint=auto
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["global_step"] == 3
    steps = [r["step"] for r in read_jsonl(tmp_path / "run2" / "metrics.jsonl") if "loss" in r]
    assert steps == [3]  # steps 1-2 were not redone
    with pytest.raises(ConfigError, match="resume.overwrite=true"):
        _run([*base, "rl.max_steps=3", "resume.from_checkpoint=never"], tmp_path / "run3")


TOY_STEPS = 16
TOY_WINDOW = 5


def test_grpo_mean_reward_rises_on_a_toy_verifiable_task(tmp_path, models_cache_dir, tiny_model_dir):
    """Reward = share of even token ids in the completion (tests/fixtures/rl/rl_toy_task.py): a random policy
    scores ~0.5 with spread inside each group; GRPO must push it up. Asserts a rise of the per-step mean reward
    between the first and the last 5 of 16 steps that is large (> 0.15) and statistically clear (Welch t > 4)."""
    overrides = [
        *_common(tmp_path, models_cache_dir, "toy"), "rl=grpo", "logging=none",
        f"rl.data.path={FIX / 'toy_questions.json'}", "rl.data.eval_ratio=0",
        "rl.rewards=[rl_toy_task:even_token_share]", "rl.kl_coef=0", "rl.temperature=1.0",
        "rl.num_generations=8", "rl.per_device_batch_size=16", "rl.gradient_accumulation_steps=1",
        "rl.max_completion_length=8", f"rl.max_steps={TOY_STEPS}", "rl.num_epochs=100",
        "rl.learning_rate=2e-2", "rl.lr_scheduler=constant", "rl.warmup_ratio=0",
        "checkpoint.every_n_steps=0", "checkpoint.save_at_epoch_end=false", "checkpoint.save_final=false",
        "rl.samples_every_n_steps=0", "seed=3",
    ]  # fmt: skip
    run_dir = tmp_path / "run"
    _run(overrides, run_dir)
    rewards = [r["reward"] for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("reward") is not None]
    assert len(rewards) == TOY_STEPS
    first, last = rewards[:TOY_WINDOW], rewards[-TOY_WINDOW:]
    gain = statistics.mean(last) - statistics.mean(first)
    se = math.sqrt(statistics.variance(first) / TOY_WINDOW + statistics.variance(last) / TOY_WINDOW)
    t = gain / max(se, 1e-6)
    (tmp_path / "toy_result.json").write_text(json.dumps({"rewards": rewards, "gain": gain, "t": t}))
    print(f"toy task: first {TOY_WINDOW} steps {statistics.mean(first):.3f}, last {TOY_WINDOW} "
          f"{statistics.mean(last):.3f}, gain {gain:.3f}, Welch t {t:.1f}")  # fmt: skip
    assert gain > 0.15 and t > 4, rewards
