"""Secrets never enter a config: overrides that name or carry one are refused before Hydra writes anything, a
config value that resolves to one is refused at validation, and what is logged anyway is redacted. Appended
(`+key=value`) overrides of keys outside the schema fail like typos."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from medsft.config import validate
from medsft.config.overrides import override_problems, unknown_override_keys
from medsft.config.secrets import REDACTED, redact, secret_config_problems, secret_override_problems
from medsft.errors import ConfigError
from medsft.sweep import job_dirname

ROOT = Path(__file__).resolve().parents[1]
FAKE_HF = "hf_FAKEtokenFORtestsONLY1234567890"
FAKE_WANDB = "0123456789abcdef0123456789abcdef01234567"
FAKE_OPENAI = "sk-proj-FAKEopenaiKEYforTESTSonly0123456789"


@pytest.mark.parametrize("arg", [
    f"+hf_token={FAKE_HF}", "+hf_token=anything", "+logging.wandb_api_key=x", "++db.password=hunter2",
    "+secret=1", "~hub_token", f"data.name={FAKE_HF}", f"model.path=https://user:{FAKE_HF}@huggingface.co/x",
    f"optimizer.learning_rate=1e-3,{FAKE_OPENAI}", f"logging.wandb_entity={FAKE_WANDB}",
    f"hydra.run.dir=/runs/{FAKE_HF}", f"--config-dir=/x/{FAKE_HF}", "data.path=ghp_" + "a" * 36,
])
def test_overrides_that_name_or_carry_a_secret_are_refused_without_echoing_it(arg):
    problems = secret_override_problems([arg], environ={})
    assert len(problems) == 1, problems
    for token in (FAKE_HF, FAKE_WANDB, FAKE_OPENAI, "hunter2", "ghp_aaaa"):
        assert token not in problems[0]
    assert "environment" in " ".join(override_problems([arg]))  # says where secrets go instead


@pytest.mark.parametrize("arg", [
    "optimizer.learning_rate=1e-5", "model.path=meta-llama/Llama-3.2-1B-Instruct", f"model.revision={FAKE_WANDB}",
    "generation_check.max_new_tokens=384", "checkpoint.eval_max_new_tokens=64", "data.name=task-classification-v2",
    "model.tiny.num_key_value_heads=2", "experiment=local_test", "--multirun", "--cfg", "job", "hf_repo_id=me/model",
])
def test_ordinary_overrides_are_not_mistaken_for_secrets(arg):
    assert secret_override_problems([arg], environ={}) == []


def test_a_secret_environment_value_inside_an_override_is_refused():
    env = {"MY_SERVICE_TOKEN": "opaque-but-long-secret-42"}
    assert secret_override_problems(["data.name=x-opaque-but-long-secret-42"], environ=env)
    assert redact("at opaque-but-long-secret-42 now", environ=env) == f"at {REDACTED} now"


def test_redaction_of_text_dicts_and_lists():
    assert FAKE_HF not in redact(f"Error executing job with overrides: ['data.name={FAKE_HF}']", environ={})
    assert redact({"hf_token": "abc", "n": [f"x {FAKE_OPENAI}"]}, environ={}) == {"hf_token": REDACTED,
                                                                                  "n": [f"x {REDACTED}"]}
    assert FAKE_HF not in job_dirname(f"data.name={FAKE_HF},optimizer.learning_rate=0.1")


def test_appended_keys_outside_the_schema_fail_like_typos():
    messages = unknown_override_keys(["+optimizer.lrr=1", "+foo=1", "++train.max_stepz=2"])
    assert len(messages) == 3
    assert "optimizer.lrr" in messages[0] and "learning_rate" in messages[0]
    assert "'foo'" in messages[1] and "did you mean train.max_steps?" in messages[2]
    # appending groups, Hydra's own keys and package overrides stays allowed
    assert unknown_override_keys(["+experiment=demo", "+hparams_search=lr_optuna", "+hydra.job.env_set.X=1",
                                  "hydra/launcher=slurm"]) == []


def test_a_config_value_that_resolves_to_a_secret_is_refused(compose_config, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", FAKE_HF)
    cfg = compose_config("~experiment", "data.name=${oc.env:HF_TOKEN}")
    assert secret_config_problems(cfg)
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert "data.name" in str(info.value) and FAKE_HF not in str(info.value)


def test_medsft_eval_refuses_a_secret_override_too():
    from medsft.cli.eval import cli_main

    with pytest.raises(ConfigError) as refused:
        cli_main(["eval=headqa_es", f"model.path=https://x:{FAKE_HF}@huggingface.co/m"])
    assert "model.path" in str(refused.value) and FAKE_HF not in str(refused.value)


def _files_holding(root: Path, *needles: str) -> list[str]:
    found = []
    for path in root.rglob("*"):
        if path.is_file():
            blob = path.read_bytes()
            if any(n.encode() in blob for n in needles):
                found.append(str(path))
    return found


@pytest.mark.parametrize("command", [[str(ROOT / "launch.py")], ["-m", "medsft.cli", "train"]],
                         ids=["launch.py", "medsft train"])
def test_a_secret_on_the_command_line_is_refused_before_anything_is_written(tmp_path, command):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    for args in ([f"+hf_token={FAKE_HF}", "model=tiny_random"],
                 ["--multirun", f"optimizer.learning_rate=1e-3,{FAKE_OPENAI}", f"+logging.wandb_api_key={FAKE_WANDB}"],
                 ["+optimizer.lrr=1"]):
        done = subprocess.run([sys.executable, *command, *args, f"output_dir={tmp_path / 'ckpts'}"], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, done.stderr[-2000:]
        out = done.stdout + done.stderr
        assert "Traceback" not in out and FAKE_HF not in out and FAKE_WANDB not in out and FAKE_OPENAI not in out
        assert ("environment" in out) or ("unknown config key 'optimizer.lrr'" in out), out
    assert list(tmp_path.iterdir()) == []  # no outputs/, multirun_outputs/, .hydra/ or checkpoint folder


@pytest.mark.slow
def test_no_file_of_a_sweep_holds_a_secret_from_the_environment(tmp_path, models_cache_dir, tiny_model_dir):
    """A sweep with the tokens in the environment, one job trying to interpolate one into its config: that job
    is refused (recorded in its final.json), the other trains; no file anywhere holds a token."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
           "HF_TOKEN": FAKE_HF, "WANDB_API_KEY": FAKE_WANDB, "OPENAI_API_KEY": FAKE_OPENAI}
    done = subprocess.run(
        [sys.executable, str(ROOT / "launch.py"), "--multirun", "model=tiny_random", "logging=wandb_offline",
         "logging.progress_bar=false", "generation_check.enabled=false", "train.max_steps=1", "data.max_samples=8",
         "train.train_bsz_per_gpu=2", "data.overlong=truncate", f"model.cache_dir={models_cache_dir}",
         f"data.cache_dir={tmp_path / 'data'}", f"output_dir={tmp_path / 'ckpts'}", f"log_dir={tmp_path / 'logs'}",
         f"hydra.sweep.dir={tmp_path / 'sweep'}", "data.name=plain,${oc.env:HF_TOKEN}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    out = done.stdout + done.stderr
    assert done.returncode == 1, out[-3000:]  # one job failed, the sweep says so
    assert "Traceback" not in out
    finals = sorted((tmp_path / "sweep").glob("*/final.json"))
    assert [f.read_text().count('"status": "completed"') for f in finals] == [1, 0]
    assert "data.name" in finals[1].read_text()  # the refusal names the key ...
    assert not _files_holding(tmp_path, FAKE_HF, FAKE_WANDB, FAKE_OPENAI)  # ... and no file holds a secret
    assert FAKE_HF not in out and FAKE_WANDB not in out
    assert list((tmp_path / "logs").rglob("offline-run-*"))  # wandb really wrote its files
