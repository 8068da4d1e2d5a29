"""Typed schema of the `rl` config group (stage 2: reinforcement learning with verifier rewards).

Selected with `stage=rl rl=grpo` or `stage=rl rl=ppo` (`conf/config.yaml` lists `rl: null`, so no `+` is
needed). `conf/rl/base.yaml` starts with `defaults: [rl_schema, data: demo_es, _self_]`: the schema below types
every key (a typo such as `rl.kl_coeff=0.1` fails at composition), and the nested group `rl/data` picks the
RL data preset (`rl/data=huatuo_en` for HuatuoGPT-o1's English fields, `rl/data=custom_es rl.data.path=...`).
Types only: the values are in conf/rl/ (base.yaml, and what grpo.yaml / ppo.yaml change).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from omegaconf import MISSING

BUILTIN_REWARDS = ("format", "rule", "model_verifier")
ALGORITHMS = ("grpo", "ppo")
# TRL 1.16 GRPOTrainer loss aggregations that use the clipped PPO surrogate (the ones PPO can reuse).
LOSS_TYPES = ("dapo", "grpo", "bnpo", "dr_grpo")


@dataclass
class RLDataFields:
    """Record keys. Open-ended records: question + answer. Multiple-choice records: mcq_* keys."""

    question: str = MISSING
    answer: str = MISSING
    mcq_question: str = MISSING
    mcq_options: str = MISSING
    mcq_answer: str = MISSING


@dataclass
class RLDataConfig:
    name: str = MISSING
    path: str = MISSING
    format: str = MISSING
    kind: str = MISSING
    fields: RLDataFields = field(default_factory=RLDataFields)
    language: str = MISSING
    mcq_prompt_template: Optional[str] = MISSING
    system_prompt: Optional[str] = MISSING
    max_samples: int = MISSING
    eval_ratio: float = MISSING
    eval_max: int = MISSING
    eval_path: Optional[str] = MISSING
    max_prompt_len: int = MISSING
    on_invalid: str = MISSING


@dataclass
class RuleVerifierConfig:
    """Rule verifier: the Final Response matches the reference (option letter, option text, normalised string)."""

    correct_reward: float = MISSING
    incorrect_reward: float = MISSING
    format_fail_reward: float = MISSING


@dataclass
class ModelVerifierConfig:
    """A sequence-classification verifier with HuatuoGPT-o1's input layout (medical_o1_verifier_3B)."""

    path: Optional[str] = MISSING
    threshold: float = MISSING
    true_label: int = MISSING
    max_length: int = MISSING
    correct_reward: float = MISSING
    incorrect_reward: float = MISSING
    format_fail_reward: float = MISSING
    batch_size: int = MISSING
    dtype: str = MISSING


@dataclass
class PPOValueConfig:
    """PPO only: the value model and GAE (TRL 0.13 PPOTrainer semantics, as HuatuoGPT-o1 used)."""

    value_model_path: Optional[str] = MISSING
    value_learning_rate: Optional[float] = MISSING
    vf_coef: float = MISSING
    cliprange_value: float = MISSING
    gamma: float = MISSING
    lam: float = MISSING
    whiten_rewards: bool = MISSING


@dataclass
class RLConfig:
    name: str = MISSING
    algorithm: str = MISSING
    rewards: list[str] = MISSING
    reward_weights: Optional[list[float]] = MISSING
    learning_rate: float = MISSING
    lr_scheduler: str = MISSING
    warmup_ratio: float = MISSING
    weight_decay: float = MISSING
    max_grad_norm: float = MISSING
    kl_coef: float = MISSING
    clip_eps: float = MISSING
    clip_eps_high: Optional[float] = MISSING
    loss_type: str = MISSING
    scale_rewards: str = MISSING
    num_generations: int = MISSING
    max_completion_length: int = MISSING
    temperature: float = MISSING
    top_p: float = MISSING
    mask_truncated_completions: bool = MISSING
    per_device_batch_size: int = MISSING
    gradient_accumulation_steps: int = MISSING
    num_iterations: int = MISSING
    num_epochs: float = MISSING
    max_steps: int = MISSING
    eval_every_n_steps: int = MISSING
    samples_every_n_steps: int = MISSING
    samples_per_write: int = MISSING
    data: RLDataConfig = field(default_factory=RLDataConfig)
    rule: RuleVerifierConfig = field(default_factory=RuleVerifierConfig)
    verifier: ModelVerifierConfig = field(default_factory=ModelVerifierConfig)
    ppo: PPOValueConfig = field(default_factory=PPOValueConfig)
