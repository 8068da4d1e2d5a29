"""Typed schema of the `rl` config group (stage 2: reinforcement learning with verifier rewards).

Selected with `stage=rl rl=grpo` or `stage=rl rl=ppo` (`conf/config.yaml` lists `rl: null`, so no `+` is
needed). `conf/rl/*.yaml` start with `defaults: [rl_schema, data: demo_es, _self_]`: the schema below types
every key (a typo such as `rl.kl_coeff=0.1` fails at composition), and the nested group `rl/data` picks the
RL data preset (`rl/data=huatuo_en` for HuatuoGPT-o1's English fields, `rl/data=custom_es rl.data.path=...`).

Defaults here are GRPO's; `conf/rl/ppo.yaml` carries HuatuoGPT-o1's stage-2 PPO values.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from medsft.errors import ConfigError

BUILTIN_REWARDS = ("format", "rule", "model_verifier")
ALGORITHMS = ("grpo", "ppo")
# TRL 1.16 GRPOTrainer loss aggregations that use the clipped PPO surrogate (the ones PPO can reuse).
LOSS_TYPES = ("dapo", "grpo", "bnpo", "dr_grpo")
_CUSTOM_REWARD = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


@dataclass
class RLDataFields:
    """Record keys. Open-ended records: question + answer. Multiple-choice records: mcq_* keys."""

    question: str = "Pregunta_Verificable"
    answer: str = "Respuesta_Verdadera"
    mcq_question: str = "question"
    mcq_options: str = "options"  # a dict {A: text, ...} or a list of texts
    mcq_answer: str = "answer_idx"  # a letter (or 1-based number); else `answer` equal to one option's text


@dataclass
class RLDataConfig:
    name: str = "demo_es"
    path: str = MISSING
    format: str = "auto"  # auto | json | jsonl | parquet
    # auto: a record with the open-ended question key is open-ended, else multiple choice; open | mcq force one.
    kind: str = "auto"
    fields: RLDataFields = field(default_factory=RLDataFields)
    # Language of the multiple-choice prompt (the evaluation prompt of medsft.eval, so RL and eval agree).
    language: str = "es"  # es | en
    mcq_prompt_template: Optional[str] = None  # {question} and {option_str}; null = the eval prompt of `language`
    # null = data.system_prompt: prompts are rendered exactly as in SFT (chat template + system turn).
    system_prompt: Optional[str] = None
    max_samples: int = 0  # 0 = all (applied after the eval split)
    # Seeded held-out split (HuatuoGPT-o1: 10%, at most 200); eval_path replaces it with a file.
    eval_ratio: float = 0.1
    eval_max: int = 200
    eval_path: Optional[str] = None
    max_prompt_len: int = 1024  # prompt tokens; longer prompts are dropped and counted
    on_invalid: str = "error"  # error | skip


@dataclass
class RuleVerifierConfig:
    """Rule verifier: the Final Response matches the reference (option letter, option text, normalised string)."""

    correct_reward: float = 1.0
    incorrect_reward: float = 0.1  # HuatuoGPT-o1's value for a well-formed wrong answer
    format_fail_reward: float = 0.0


@dataclass
class ModelVerifierConfig:
    """A sequence-classification verifier with HuatuoGPT-o1's input layout (medical_o1_verifier_3B)."""

    path: Optional[str] = None  # local directory or Hub id of an AutoModelForSequenceClassification checkpoint
    threshold: float = 0.4  # reward correct_reward when P(True) > threshold
    true_label: int = 1  # index of the "True" class (HuatuoGPT-o1: softmax(logits)[:, 1])
    max_length: int = 4000  # verifier input tokens; the response is cut in the middle, never the reference
    correct_reward: float = 1.0
    incorrect_reward: float = 0.1
    format_fail_reward: float = 0.0
    batch_size: int = 8
    dtype: str = "auto"  # auto (bf16 on a bf16 GPU, else fp32) | float32 | bfloat16 | float16


@dataclass
class PPOValueConfig:
    """PPO only: the value model and GAE (TRL 0.13 PPOTrainer semantics, as HuatuoGPT-o1 used)."""

    # null = initialise the value model from the policy checkpoint (model.path) with a fresh scalar head.
    value_model_path: Optional[str] = None
    value_learning_rate: Optional[float] = None  # null = rl.learning_rate
    vf_coef: float = 0.1
    cliprange_value: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    whiten_rewards: bool = False


@dataclass
class RLConfig:
    name: str = "grpo"
    algorithm: str = "grpo"  # grpo | ppo
    # Reward functions, summed with reward_weights: format | rule | model_verifier | "package.module:function"
    # (a TRL reward callable: f(prompts, completions, **columns) -> list[float | None]).
    rewards: list[str] = field(default_factory=lambda: ["format", "rule"])
    reward_weights: Optional[list[float]] = None  # null = 1.0 each
    # Optimisation (the policy). SFT's `optimizer` group does not apply to RL.
    learning_rate: float = 1.0e-6
    lr_scheduler: str = "linear"  # linear | cosine | constant (with warmup)
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    # KL coefficient: GRPO = beta of the KL loss term; PPO = per-token KL penalty inside the reward.
    kl_coef: float = 0.04
    clip_eps: float = 0.2  # PPO/GRPO ratio clip
    clip_eps_high: Optional[float] = None  # null = clip_eps (set > clip_eps for DAPO's clip-higher)
    loss_type: str = "dapo"  # dapo | grpo | bnpo | dr_grpo (TRL's aggregations)
    scale_rewards: str = "group"  # group | batch | none (GRPO advantages)
    # Rollouts
    num_generations: int = 8  # completions per prompt (GRPO's group size; PPO: 1 as in the paper)
    max_completion_length: int = 1024
    temperature: float = 0.7
    top_p: float = 1.0
    mask_truncated_completions: bool = False
    # Schedule. One optimizer step = per_device_batch_size x processes x gradient_accumulation_steps completions.
    per_device_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    num_iterations: int = 1  # optimisation passes over each batch of rollouts (PPO epochs)
    num_epochs: float = 1.0  # passes over the training questions
    max_steps: int = 0  # >0 caps optimizer steps
    # Logging
    eval_every_n_steps: int = 0  # eval reward on the held-out split every N steps (0 = never)
    samples_every_n_steps: int = 10  # write sample generations to <run dir>/samples/ every N steps
    samples_per_write: int = 4
    data: RLDataConfig = field(default_factory=RLDataConfig)
    rule: RuleVerifierConfig = field(default_factory=RuleVerifierConfig)
    verifier: ModelVerifierConfig = field(default_factory=ModelVerifierConfig)
    ppo: PPOValueConfig = field(default_factory=PPOValueConfig)


def register_rl_configs() -> None:
    """Store the schema as `rl/rl_schema`, named first in every `conf/rl/*.yaml` defaults list."""
    ConfigStore.instance().store(group="rl", name="rl_schema", node=RLConfig)


def validate_rl(cfg: DictConfig) -> None:
    """Cross-field checks of `cfg.rl` (run by the RL stage before loading anything); ConfigError names the key."""
    rl = cfg.get("rl")
    if rl is None:
        raise ConfigError("stage=rl needs an RL preset: add rl=grpo or rl=ppo (conf/rl/)")
    problems: list[str] = []

    def choice(key: str, value: Any, allowed: tuple) -> None:
        if value not in allowed:
            problems.append(f"rl.{key}={value!r} is not one of {list(allowed)}")

    choice("algorithm", rl.algorithm, ALGORITHMS)
    choice("loss_type", rl.loss_type, LOSS_TYPES)
    choice("scale_rewards", rl.scale_rewards, ("group", "batch", "none"))
    choice("lr_scheduler", rl.lr_scheduler, ("linear", "cosine", "constant"))
    choice("data.kind", rl.data.kind, ("auto", "open", "mcq"))
    choice("data.format", rl.data.format, ("auto", "json", "jsonl", "parquet"))
    choice("data.language", rl.data.language, ("es", "en"))
    choice("data.on_invalid", rl.data.on_invalid, ("error", "skip"))
    choice("verifier.dtype", rl.verifier.dtype, ("auto", "float32", "bfloat16", "float16"))

    rewards = list(rl.rewards or [])
    if not rewards:
        problems.append("rl.rewards is empty: name at least one of " + ", ".join(BUILTIN_REWARDS))
    for name in rewards:
        if name not in BUILTIN_REWARDS and not _CUSTOM_REWARD.match(str(name)):
            problems.append(f"rl.rewards: {name!r} is not one of {list(BUILTIN_REWARDS)} or 'package.module:function'")
    if len(set(rewards)) != len(rewards):
        problems.append(f"rl.rewards={rewards} names a reward twice")
    if rl.reward_weights is not None and len(rl.reward_weights) != len(rewards):
        problems.append(f"rl.reward_weights has {len(rl.reward_weights)} entries for {len(rewards)} rewards")
    if "model_verifier" in rewards and not rl.verifier.path:
        problems.append("rl.rewards includes model_verifier but rl.verifier.path is not set (a local "
                        "AutoModelForSequenceClassification directory or Hub id)")  # fmt: skip

    for key in ("learning_rate", "temperature"):
        if not rl[key] > 0:
            problems.append(f"rl.{key}={rl[key]} must be > 0")
    for key in ("per_device_batch_size", "gradient_accumulation_steps", "num_iterations", "num_generations",
                "max_completion_length", "samples_per_write", "verifier.batch_size", "verifier.max_length",
                "data.max_prompt_len"):  # fmt: skip
        value = OmegaConf.select(rl, key)
        if value is None or value < 1:
            problems.append(f"rl.{key}={value!r} must be >= 1")
    for key in ("kl_coef", "max_steps", "eval_every_n_steps", "samples_every_n_steps", "weight_decay",
                "max_grad_norm", "data.max_samples", "data.eval_max", "num_epochs"):  # fmt: skip
        value = OmegaConf.select(rl, key)
        if value is None or value < 0:
            problems.append(f"rl.{key}={value!r} must be >= 0")
    if rl.max_steps == 0 and rl.num_epochs <= 0:
        problems.append("rl.num_epochs must be > 0 when rl.max_steps=0")
    if not 0.0 < rl.clip_eps < 1.0:
        problems.append(f"rl.clip_eps={rl.clip_eps} must be in (0, 1)")
    if rl.clip_eps_high is not None and rl.clip_eps_high < rl.clip_eps:
        problems.append(f"rl.clip_eps_high={rl.clip_eps_high} must be >= rl.clip_eps={rl.clip_eps}")
    if not 0.0 < rl.top_p <= 1.0:
        problems.append(f"rl.top_p={rl.top_p} must be in (0, 1]")
    if not 0.0 <= rl.warmup_ratio <= 1.0:
        problems.append(f"rl.warmup_ratio={rl.warmup_ratio} must be in [0, 1]")
    if not 0.0 <= rl.data.eval_ratio < 1.0:
        problems.append(f"rl.data.eval_ratio={rl.data.eval_ratio} must be in [0, 1)")
    if not 0.0 <= rl.verifier.threshold <= 1.0:
        problems.append(f"rl.verifier.threshold={rl.verifier.threshold} must be in [0, 1]")
    if rl.algorithm == "grpo" and rl.num_generations < 2:
        problems.append(f"rl.num_generations={rl.num_generations}: GRPO needs >= 2 completions per prompt "
                        "(the group is its baseline); use rl=ppo for one completion per prompt")  # fmt: skip
    world = int(OmegaConf.select(cfg, "launcher.num_processes", default=1) or 1) * int(
        OmegaConf.select(cfg, "launcher.num_machines", default=1) or 1
    )
    batch = rl.per_device_batch_size * world * rl.gradient_accumulation_steps
    if rl.num_generations >= 1 and batch % rl.num_generations:
        problems.append(
            f"rl.per_device_batch_size x processes x rl.gradient_accumulation_steps = {batch} completions per "
            f"step must be a multiple of rl.num_generations={rl.num_generations} (whole prompt groups)"
        )
    if rl.algorithm == "ppo":
        if not 0.0 <= rl.ppo.lam <= 1.0 or not 0.0 <= rl.ppo.gamma <= 1.0:
            problems.append("rl.ppo.gamma and rl.ppo.lam must be in [0, 1]")
        if rl.ppo.vf_coef < 0 or rl.ppo.cliprange_value <= 0:
            problems.append("rl.ppo.vf_coef must be >= 0 and rl.ppo.cliprange_value > 0")
        if rl.num_generations == 1 and batch < 2:
            problems.append(f"rl=ppo needs >= 2 rollouts per optimizer step (now {batch}): raise "
                            "rl.per_device_batch_size or rl.gradient_accumulation_steps")  # fmt: skip
    if problems:
        raise ConfigError("invalid RL config:\n  - " + "\n  - ".join(problems))
