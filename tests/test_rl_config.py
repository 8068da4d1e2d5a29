"""The `rl` config group: presets compose typed, the paper's PPO values, and validate_rl's errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from medsft.config import validate, validate_rl
from medsft.config.rl import RLConfig
from medsft.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def presets(folder: Path) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.yaml") if p.stem != "base")


@pytest.mark.parametrize("preset", presets(CONF / "rl"))
@pytest.mark.parametrize("data", presets(CONF / "rl" / "data"))
def test_every_rl_preset_and_data_option_composes_typed_and_validates(compose_config, preset, data):
    cfg = compose_config("stage=rl", f"rl={preset}", f"rl/data={data}", "rl.data.path=x.json",
                      "rl.verifier.path=/some/verifier")  # fmt: skip
    assert OmegaConf.get_type(cfg.rl) is RLConfig and cfg.rl.name == preset and cfg.rl.data.name == data
    validate(cfg)
    validate_rl(cfg)


def test_rl_is_off_by_default_and_sft_configs_are_unchanged(compose_config):
    cfg = compose_config()
    assert cfg.rl is None and cfg.stage == "sft"
    with pytest.raises(ConfigError, match="rl=grpo or rl=ppo"):
        validate_rl(compose_config("stage=rl"))


def test_ppo_preset_carries_huatuo_stage2_hyperparameters(compose_config):
    rl = compose_config("stage=rl", "rl=ppo").rl
    assert rl.algorithm == "ppo" and list(rl.rewards) == ["model_verifier"]
    assert rl.verifier.path == "FreedomIntelligence/medical_o1_verifier_3B"
    assert (rl.verifier.threshold, rl.verifier.correct_reward, rl.verifier.incorrect_reward) == (0.4, 1.0, 0.1)
    assert rl.verifier.format_fail_reward == 0.0 and rl.verifier.max_length == 4000
    assert (rl.kl_coef, rl.clip_eps, rl.learning_rate, rl.warmup_ratio) == (0.03, 0.2, 5e-7, 0.05)
    assert (rl.ppo.gamma, rl.ppo.lam, rl.ppo.vf_coef, rl.ppo.cliprange_value) == (1.0, 0.95, 0.1, 0.2)
    assert (rl.num_iterations, rl.max_completion_length, rl.temperature) == (3, 1300, 0.5)
    assert (rl.per_device_batch_size, rl.gradient_accumulation_steps, rl.num_generations) == (1, 16, 1)
    assert rl.data.fields.question == "Pregunta_Verificable" and rl.data.fields.answer == "Respuesta_Verdadera"


def test_huatuo_english_data_preset(compose_config):
    data = compose_config("stage=rl", "rl=grpo", "rl/data=huatuo_en").rl.data
    assert (data.fields.question, data.fields.answer, data.language) == (
        "Open-ended Verifiable Question", "Ground-True Answer", "en")
    assert OmegaConf.is_missing(data, "path")


@pytest.mark.parametrize("override,error", [("rl.kl_coeff=0.1", "rl.kl_coeff"), ("rl.kl_coef=abc", "kl_coef"),
                                            ("rl.data.fields.questio=x", "questio")])  # fmt: skip
def test_typos_and_wrong_types_fail_at_composition(compose_config, override, error):
    with pytest.raises(ConfigCompositionException, match=error):
        compose_config("stage=rl", "rl=grpo", override)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["rl=grpo", "rl.num_generations=1"], "GRPO needs >= 2"),
        (["rl=grpo", "rl.num_generations=3"], "multiple of rl.num_generations=3"),
        (["rl=grpo", "rl.rewards=[format,nope]"], "'nope' is not one of"),
        (["rl=grpo", "rl.rewards=[]"], "rl.rewards is empty"),
        (["rl=grpo", "rl.rewards=[format,format]"], "names a reward twice"),
        (["rl=grpo", "rl.reward_weights=[1.0]"], "1 entries for 2 rewards"),
        (["rl=grpo", "rl.rewards=[model_verifier]"], "rl.verifier.path is not set"),
        (["rl=grpo", "rl.algorithm=dpo"], "rl.algorithm='dpo'"),
        (["rl=grpo", "rl.loss_type=sapo"], "rl.loss_type='sapo'"),
        (["rl=grpo", "rl.clip_eps=1.5"], "rl.clip_eps=1.5"),
        (["rl=grpo", "rl.learning_rate=0"], "rl.learning_rate=0"),
        (["rl=grpo", "rl.data.eval_ratio=1.0"], "rl.data.eval_ratio"),
        (["rl=grpo", "rl.data.kind=essay"], "rl.data.kind='essay'"),
        (["rl=ppo", "rl.per_device_batch_size=1", "rl.gradient_accumulation_steps=1", "rl.verifier.path=v"],
         "needs >= 2 rollouts"),
    ],
)
def test_validate_rl_names_the_key(compose_config, overrides, message):
    cfg = compose_config("stage=rl", *overrides)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        validate_rl(cfg)


def test_custom_reward_spec_is_accepted(compose_config):
    validate_rl(compose_config("stage=rl", "rl=grpo", "rl.rewards=[format,my_pkg.rewards:length_penalty]"))
