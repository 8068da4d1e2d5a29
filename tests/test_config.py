"""Config composition for every group option and experiment preset, and the start-up validation errors."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from medsft.config import validate
from medsft.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

GROUPS = ["model", "data", "optimizer", "deepspeed", "fsdp", "launcher", "logging", "experiment"]


def group_options(group):
    """The presets of a group (base.yaml holds the group's defaults that every preset extends)."""
    return sorted(p.stem for p in (CONF / group).glob("*.yaml") if p.stem != "base")


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in group_options(g)])
def test_every_group_option_composes_and_validates(compose_config, group, option):
    cfg = compose_config(f"{group}={option}", "data.path=data/demo_data.json")
    validate(cfg)
    if group not in ("experiment",):
        assert cfg[group].name == option


def test_default_is_the_cpu_demo_on_the_embedded_model(compose_config):
    cfg = compose_config()
    assert cfg.model.path == "embedded:smollm2-135m-instruct"
    assert cfg.data.path == "data/demo_data.json"
    assert cfg.generation_check.enabled


def test_seed_defaults_survive_outside_the_demo_preset(compose_config):
    cfg = compose_config("experiment=local_test")
    assert cfg.optimizer.learning_rate == 5e-6
    assert cfg.optimizer.warmup_rates == 0.05
    assert cfg.optimizer.weight_decay == 0.1
    assert cfg.train.gradient_accumulation_steps == 8
    assert cfg.data.max_seq_len == 1024 and cfg.data.max_samples == 10
    assert cfg.train.train_bsz_per_gpu == 1 and cfg.train.n_epochs == 1
    assert cfg.checkpoint.max_ckpts == 2
    prod = compose_config("experiment=medical_o1_spanish_8gpu", "data.path=x.json")
    assert prod.data.max_seq_len == 8192 and prod.train.n_epochs == 3 and prod.train.train_bsz_per_gpu == 2
    assert prod.deepspeed.name == "zero3_8gpu" and prod.launcher.num_processes == 8
    assert prod.experiment_name == "medical_sft_spanish"
    assert prod.model.path == "meta-llama/Llama-3.1-8B-Instruct"


def test_secrets_are_not_config_keys(compose_config):
    def keys(node, prefix=""):
        for key, value in node.items():
            yield f"{prefix}{key}"
            if isinstance(value, dict):
                yield from keys(value, f"{prefix}{key}.")

    names = list(keys(OmegaConf.to_container(compose_config())))
    assert not [n for n in names if n.endswith("token") or "api_key" in n or "secret" in n]


@pytest.mark.parametrize(
    "override,expected",
    [
        ("data.overlong=chop", "data.overlong='chop' is not one of ['drop', 'truncate', 'error']"),
        ("train.train_bsz_per_gpu=0", "train.train_bsz_per_gpu=0 must be >= 1"),
        ("data.val_ratio=1.5", "data.val_ratio=1.5 must be in [0, 1)"),
        ("push_to_hub=true", "push_to_hub=true needs hf_repo_id"),
        ("data.response_template=no_placeholders", "data.response_template must contain {reasoning}"),
    ],
)
def test_cross_field_validation_names_the_key(compose_config, override, expected):
    with pytest.raises(ConfigError) as info:
        validate(compose_config(override))
    assert expected in str(info.value)


def _launch(*args, timeout=120):
    return subprocess.run([sys.executable, str(ROOT / "launch.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


@pytest.mark.parametrize(
    "override,needles",
    [
        ("optimizer.lrr=1", ["optimizer.lrr", "lrr"]),
        ("optimizer.learning_rate=abc", ["optimizer.learning_rate", "abc"]),
        ("deepspeed=zero9", ["deepspeed/zero9", "zero2_local", "zero3_8gpu"]),
    ],
)
def test_launcher_rejects_bad_overrides_before_loading_anything(override, needles):
    result = _launch(override)
    assert result.returncode != 0
    for needle in needles:
        assert needle in result.stdout + result.stderr


def test_launcher_rejects_invalid_values_with_a_clean_message():
    result = _launch("data.overlong=chop", "model.path=/nonexistent/never/loaded")
    assert result.returncode == 2
    assert "data.overlong='chop'" in result.stderr
    assert "Traceback" not in result.stderr


def test_cfg_job_prints_the_tree_and_help_lists_groups():
    printed = _launch("--cfg", "job")
    assert printed.returncode == 0 and "learning_rate" in printed.stdout
    helped = _launch("--help")  # one line per group: `  model             llama3_1_8b_instruct, ...`
    for group in ("model", "data", "optimizer", "deepspeed", "logging", "experiment"):
        assert re.search(rf"^  {group}\s{{2,}}\w", helped.stdout, re.M), group


def test_launcher_is_thin():
    assert len((ROOT / "launch.py").read_text().splitlines()) < 60


def test_missing_required_data_path_is_reported():
    result = _launch("data=custom_es")
    assert result.returncode == 2
    assert "data.path" in result.stderr


def test_unknown_key_names_the_allowed_keys_and_a_likely_fix():
    result = _launch("train.max_stepz=3")
    assert result.returncode == 2
    assert "did you mean train.max_steps?" in result.stderr
    assert "gradient_accumulation_steps" in result.stderr  # the allowed keys are listed
    from medsft.config import unknown_override_keys

    assert unknown_override_keys(["experiment=local_test", "model=tiny_random", "hydra.run.dir=x", "rl.kl_coef=1",
                                  "+experiment=demo", "hydra/launcher=slurm", "data.fields.question=Q",
                                  "~experiment"]) == []


def test_the_experiment_preset_is_said_and_an_implicit_demo_on_many_processes_warned(compose_config):
    """`python launch.py` alone is the CPU demo; a multi-process or DeepSpeed run that names no experiment gets
    the demo's hyperparameters and is warned (issue 16), a named preset or `~experiment` is not."""
    from medsft.config.presets import experiment_notice, experiment_of, named_experiment

    assert experiment_of([]) == ("demo", False)
    assert experiment_of(["experiment=local_test"]) == ("local_test", True)
    assert experiment_of(["~experiment"]) == (None, True) and named_experiment(["experiment=null"]) == (True, None)

    line, warning = experiment_notice(compose_config(), [])
    assert line == "config: experiment=demo (the default: no experiment= given)" and warning is None  # the demo
    big = ["deepspeed=zero3_8gpu", "launcher.num_processes=8"]
    line, warning = experiment_notice(compose_config(*big), big)
    assert "8-process DeepSpeed run takes the CPU demo preset's hyperparameters" in warning
    assert "lr 0.0005, 4 per device x 1 accumulation, 2 epochs capped at 48 steps, seq 512" in warning and "~experiment" in warning
    for named in (["~experiment", *big], ["experiment=medical_o1_spanish_8gpu"]):
        line, warning = experiment_notice(compose_config(*named), named)
        assert warning is None, named
    assert experiment_notice(compose_config("~experiment"), ["~experiment"])[0] == \
        "config: no experiment preset: conf/'s defaults, the seed's values"


def test_adamw_betas_are_the_seeds_and_the_demo_keeps_its_measured_ones(compose_config):
    assert list(compose_config("~experiment").optimizer.betas) == [0.9, 0.999]  # torch's default, as the seed
    assert list(compose_config("experiment=medical_o1_spanish_8gpu").optimizer.betas) == [0.9, 0.999]
    assert list(compose_config().optimizer.betas) == [0.9, 0.95]  # the demo, as its README figures were measured
