"""The checks Hydra cannot express: allowed values, ranges and cross-field rules of the training config
(`validate`), the RL group (`validate_rl`) and the eval config (`validate_eval`). Each raises one ConfigError
that lists every problem, naming the key and what is allowed."""

from __future__ import annotations

import re
from typing import Any

from omegaconf import DictConfig, OmegaConf

from medsft.config.data import FILE_TYPES, data_problems
from medsft.config.evaluate import EVAL_KINDS
from medsft.config.ranges import (
    betas_problems,
    eval_benchmark_problems,
    experiment_name_problems,
    launcher_problems,
    location_problems,
    non_finite_problems,
    range_problems,
)
from medsft.config.rl import ALGORITHMS, BUILTIN_REWARDS, LOSS_TYPES
from medsft.config.secrets import secret_config_problems
from medsft.errors import ConfigError

DATA_FORMATS = ("auto", "json", "jsonl", "parquet")  # file types (rl.data.format)
ON_INVALID = ("error", "skip")
DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")
_CUSTOM_REWARD = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")

_SFT_CHOICES = {
    "stage": ("sft", "rl"),
    "data.file_type": FILE_TYPES,
    "data.on_invalid": ON_INVALID,
    "data.overlong": ("drop", "truncate", "error"),
    "data.loss_turns": ("all", "last"),
    "data.headers_in_text": ("warn", "skip", "error"),
    "optimizer.name": ("adamw",),
    "optimizer.scheduler": ("cosine", "linear", "constant"),
    "train.mixed_precision": ("auto", "no", "bf16", "fp16"),
    "model.dtype": DTYPE_NAMES,
    "model.attn_implementation": ("sdpa", "eager", "flash_attention_2", "flex_attention"),
    "logging.backend": ("wandb", "none"),
    "logging.wandb_mode": ("offline", "online", "disabled"),
    "deepspeed.zero_stage": (0, 1, 2, 3),
    "fsdp.sharding": ("full_shard", "shard_grad_op"),
    "fsdp.reduce_dtype": ("auto", "float32"),
    "launcher.rdzv_backend": ("static", "c10d"),
}

_POSITIVE = (
    "data.max_seq_len",
    "train.train_bsz_per_gpu",
    "train.gradient_accumulation_steps",
    "train.n_epochs",
    "launcher.num_processes",
    "launcher.num_machines",
    "logging.every_n_steps",
)


def validate(cfg: DictConfig) -> None:
    """Cross-field checks; raises ConfigError naming the key and what is allowed."""
    problems: list[str] = []
    for key, allowed in _SFT_CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            problems.append(f"{key}={value!r} is not one of {list(allowed)}")
    for key in _POSITIVE:
        value = OmegaConf.select(cfg, key)
        if value is None or value < 1:
            problems.append(f"{key}={value!r} must be >= 1")
    # Every numeric range, finiteness, names and places (ranges.py); secrets in values (secrets.py).
    problems += range_problems(cfg) + non_finite_problems(cfg) + betas_problems(cfg.optimizer.betas)
    problems += launcher_problems(cfg) + experiment_name_problems(cfg.experiment_name) + location_problems(cfg)
    problems += eval_benchmark_problems(cfg.checkpoint.eval_benchmark) + secret_config_problems(cfg)
    problems += data_problems(cfg.data)
    if cfg.checkpoint.max_ckpts < 1:
        problems.append(f"checkpoint.max_ckpts={cfg.checkpoint.max_ckpts} must be >= 1 (the newest is always kept)")
    if not 0.0 <= cfg.data.val_ratio < 1.0:
        problems.append(f"data.val_ratio={cfg.data.val_ratio} must be in [0, 1)")
    for name in ("question", "reasoning", "response"):
        if not cfg.data.fields[name]:
            problems.append(f"data.fields.{name} must name a record key")
    template = cfg.data.response_template
    for placeholder in ("{reasoning}", "{response}"):
        if placeholder not in template:
            problems.append(f"data.response_template must contain {placeholder}")
    if cfg.push_to_hub and not cfg.hf_repo_id:
        problems.append("push_to_hub=true needs hf_repo_id=<user>/<repo>")
    if cfg.deepspeed.enabled and cfg.deepspeed.zero_stage == 0:
        problems.append(f"deepspeed={cfg.deepspeed.name} is enabled but deepspeed.zero_stage is 0")
    problems += _fsdp_problems(cfg)
    if not cfg.generation_check.repetition_penalty > 0:
        problems.append(f"generation_check.repetition_penalty={cfg.generation_check.repetition_penalty} must be > 0 "
                        "(1.0 = none)")
    if cfg.data.packing and cfg.data.group_by_length:
        problems.append("data.packing and data.group_by_length are alternatives: enable one")
    problems += peft_problems(cfg)
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))


def _fsdp_problems(cfg: DictConfig) -> list[str]:
    """FSDP2 is the other sharding engine: never with DeepSpeed, one way of recomputing activations."""
    fsdp = cfg.fsdp
    if not fsdp.enabled:
        return []
    problems = []
    if cfg.deepspeed.enabled:
        problems.append(f"deepspeed={cfg.deepspeed.name} and fsdp={fsdp.name} are two sharding engines: choose one "
                        "(deepspeed=none or fsdp=none)")
    if fsdp.activation_checkpointing and cfg.model.gradient_checkpointing:
        problems.append("fsdp.activation_checkpointing=true and model.gradient_checkpointing=true both recompute "
                        "activations: enable one")
    if fsdp.wrap_layers is not None and not list(fsdp.wrap_layers):
        problems.append("fsdp.wrap_layers=[] names no class: list decoder layer classes, or null for the model's own")
    if cfg.stage == "rl":
        problems.append(f"fsdp={fsdp.name} applies to the SFT stage; stage=rl runs TRL's trainer without it "
                        "(use fsdp=none)")
    return problems


def peft_problems(cfg: DictConfig) -> list[str]:
    """The `peft` group's checks (CUDA for QLoRA is checked at run start: medsft.models.load)."""
    p = cfg.peft
    problems = [f"peft.{key}={p[key]!r} is not one of {list(allowed)}" for key, allowed in (
        ("bias", ("none", "all", "lora_only")), ("bnb_4bit_quant_type", ("nf4", "fp4")),
        ("bnb_4bit_compute_dtype", ("bfloat16", "float16", "float32"))) if p[key] not in allowed]
    if cfg.checkpoint.merge_adapter and not p.enabled:
        problems.append("checkpoint.merge_adapter=true needs an adapter run (peft=lora | dora | qlora)")
    if cfg.checkpoint.merge_adapter and cfg.stage == "rl":
        problems.append("checkpoint.merge_adapter=true is for stage=sft; merge an RL adapter with `medsft merge "
                        "<checkpoint> --out DIR`")
    if not p.enabled:
        if p.load_in_4bit:
            problems.append("peft.load_in_4bit=true quantises a frozen base, which needs an adapter: use peft=qlora")
        return problems
    if p.r < 1:
        problems.append(f"peft.r={p.r} must be >= 1")
    if p.alpha <= 0:
        problems.append(f"peft.alpha={p.alpha} must be > 0")
    if not 0.0 <= p.dropout < 1.0:
        problems.append(f"peft.dropout={p.dropout} must be in [0, 1)")
    targets = p.target_modules
    if targets != "all-linear" and (not OmegaConf.is_list(targets) or not len(targets)
                                    or not all(isinstance(t, str) and t for t in targets)):
        problems.append(f"peft.target_modules={targets!r} must be all-linear or a non-empty list of module names "
                        "(e.g. [q_proj,v_proj])")
    if not all(isinstance(m, str) and m for m in p.modules_to_save):
        problems.append(f"peft.modules_to_save={list(p.modules_to_save)!r} must be a list of module names")
    if p.load_in_4bit and cfg.deepspeed.enabled and cfg.deepspeed.zero_stage == 3:
        problems.append(f"peft={p.name} (4-bit base) with deepspeed={cfg.deepspeed.name} (ZeRO-3) is not supported: "
                        "the 4-bit base fits on each GPU, so use DDP (deepspeed=none) or ZeRO-2")
    if p.enabled and cfg.fsdp.enabled:
        problems.append(f"peft={p.name} with fsdp={cfg.fsdp.name} is not supported yet (adapters are tested with one "
                        "process, DDP and DeepSpeed ZeRO-2/3): use deepspeed=zero3 or fsdp=none")
    return problems


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
    choice("data.format", rl.data.format, DATA_FORMATS)
    choice("data.language", rl.data.language, ("es", "en"))
    choice("data.on_invalid", rl.data.on_invalid, ON_INVALID)
    choice("verifier.dtype", rl.verifier.dtype, DTYPE_NAMES)

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
    world = int(cfg.launcher.num_processes) * int(cfg.launcher.num_machines)
    batch = rl.per_device_batch_size * world * rl.gradient_accumulation_steps
    if rl.num_generations >= 1 and batch % rl.num_generations:
        problems.append(
            f"rl.per_device_batch_size x processes x rl.gradient_accumulation_steps = {batch} completions per "
            f"step must be a multiple of rl.num_generations={rl.num_generations} (whole prompt groups)"
        )
    if rl.algorithm == "ppo" and cfg.peft.enabled:
        problems.append(f"rl=ppo with peft={cfg.peft.name}: an adapter on the PPO policy is not supported; use "
                        "rl=grpo, or peft=none (an adapter checkpoint as model.path is fine: it loads merged)")
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


_EVAL_CHOICES = {
    "eval.kind": EVAL_KINDS,
    "eval.language": ("en", "es"),
    "eval.backend": ("transformers", "vllm"),
    "eval.device": ("auto", "cpu", "cuda"),
    "model.dtype": DTYPE_NAMES,
}


def validate_eval(cfg: DictConfig | Any) -> None:
    """Cross-field checks of an evaluate config (or of a bare `eval` node); ConfigError names the key."""
    root = cfg if OmegaConf.select(cfg, "eval") is not None else OmegaConf.create({"eval": cfg})
    problems = non_finite_problems(root) + secret_config_problems(root)
    for key, allowed in _EVAL_CHOICES.items():
        value = OmegaConf.select(root, key)
        if value is not None and value not in allowed:
            problems.append(f"{key}={value!r} is not one of {list(allowed)}")
    e = root.eval
    for key in ("max_new_tokens", "batch_size"):
        if e[key] is None or e[key] < 1:
            problems.append(f"eval.{key}={e[key]!r} must be >= 1")
    if e.limit is None or e.limit < 0:
        problems.append(f"eval.limit={e.limit!r} must be >= 0 (0 = all)")
    if e.do_sample:
        if not e.temperature or e.temperature <= 0:
            problems.append(f"eval.temperature={e.temperature} must be > 0 with eval.do_sample=true")
        if not 0 < e.top_p <= 1:
            problems.append(f"eval.top_p={e.top_p} must be in (0, 1]")
    if e.repetition_penalty is None or e.repetition_penalty <= 0:
        problems.append(f"eval.repetition_penalty={e.repetition_penalty!r} must be > 0 (1.0 = none)")
    if not e.path:
        problems.append("eval.path must name the benchmark file or folder")
    if e.prompt_template and "{question}" not in e.prompt_template:
        problems.append("eval.prompt_template must contain {question} (and usually {option_str})")
    if problems:
        raise ConfigError("invalid eval config:\n  - " + "\n  - ".join(problems))
