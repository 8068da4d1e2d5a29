"""From medsft's config to TRL's GRPOConfig (transformers TrainingArguments): the whole mapping in one place.

    rl.learning_rate / lr_scheduler / warmup_ratio / weight_decay / max_grad_norm -> the AdamW + schedule
    rl.kl_coef -> beta (GRPO: KL loss term; PPO: per-token KL penalty in the reward)
    rl.clip_eps (/ clip_eps_high) -> epsilon (/ epsilon_high);  rl.loss_type, rl.scale_rewards, rl.num_iterations
    rl.num_generations, max_completion_length, temperature, top_p, mask_truncated_completions -> rollouts
    rl.per_device_batch_size, gradient_accumulation_steps, num_epochs, max_steps -> the schedule
    seed, output_dir/experiment_name/rl_<algorithm>, checkpoint.* (every_n_steps, max_ckpts, save_final),
    logging.* (wandb offline/online/none, every_n_steps, progress bar), train.mixed_precision,
    model.gradient_checkpointing, launcher.cpu, deepspeed.* -> TrainingArguments
Everything else is TRL's default.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig
from trl import GRPOConfig

from medsft.runtime.accelerator import resolve_mixed_precision, use_cpu
from medsft.runtime.deepspeed import deepspeed_json


def deepspeed_config(cfg: DictConfig, mixed_precision: str) -> Optional[dict]:
    """The `deepspeed` group as TrainingArguments' DeepSpeed dict (medsft.runtime.deepspeed.deepspeed_json).

    RL's batch sizes and clipping live in rl.*, so they are left "auto": transformers fills them from the
    TrainingArguments built here.
    """
    if not cfg.deepspeed.enabled:
        return None
    ds = deepspeed_json(cfg, mixed_precision)
    ds.update(train_micro_batch_size_per_gpu="auto", gradient_accumulation_steps="auto", train_batch_size="auto",
              gradient_clipping="auto")  # fmt: skip
    return ds


def _report_to(cfg: DictConfig) -> str:
    if cfg.logging.backend != "wandb" or cfg.logging.wandb_mode == "disabled":
        return "none"
    wandb_dir = Path(cfg.log_dir).expanduser().resolve() / cfg.experiment_name
    wandb_dir.mkdir(parents=True, exist_ok=True)
    os.environ["WANDB_DIR"] = str(wandb_dir)
    os.environ["WANDB_MODE"] = str(cfg.logging.wandb_mode)
    os.environ["WANDB_PROJECT"] = str(cfg.logging.wandb_project)
    os.environ.setdefault("WANDB_LOG_MODEL", "false")
    if cfg.logging.wandb_entity:
        os.environ["WANDB_ENTITY"] = str(cfg.logging.wandb_entity)
    return "wandb"


def build_grpo_args(cfg: DictConfig, out_dir: Path, has_eval: bool):
    """GRPOConfig (TrainingArguments) from our config; see the module doc for the mapping."""
    rl = cfg.rl
    cpu = use_cpu(cfg)
    precision = resolve_mixed_precision(cfg, cpu)
    ck = cfg.checkpoint
    if ck.every_n_steps > 0:
        save = {"save_strategy": "steps", "save_steps": int(ck.every_n_steps)}
    elif ck.save_at_epoch_end:
        save = {"save_strategy": "epoch"}
    else:
        save = {"save_strategy": "no"}
    evaluate = has_eval and rl.eval_every_n_steps > 0
    num_generations = int(rl.num_generations)
    world = max(1, int(os.environ.get("WORLD_SIZE", "1")))
    rollouts = rl.per_device_batch_size * world * rl.gradient_accumulation_steps
    if rl.algorithm == "ppo" and num_generations == 1:
        # GRPOConfig insists on >= 2 completions per prompt (its group baseline). PPO's baseline is the value model,
        # so one completion per prompt is right; the config sees the whole rollout batch as one "group" and the PPO
        # trainer sets its real group size (1) right after construction (see medsft.rl.ppo).
        num_generations = rollouts
    scheduler = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[rl.lr_scheduler]
    return GRPOConfig(
        output_dir=str(out_dir),
        run_name=f"{cfg.experiment_name}-rl_{rl.algorithm}",
        seed=int(cfg.seed),
        data_seed=int(cfg.seed),
        # optimisation
        learning_rate=float(rl.learning_rate),
        lr_scheduler_type=scheduler,
        warmup_steps=min(float(rl.warmup_ratio), 0.999),
        weight_decay=float(rl.weight_decay),
        max_grad_norm=float(rl.max_grad_norm),
        per_device_train_batch_size=int(rl.per_device_batch_size),
        gradient_accumulation_steps=int(rl.gradient_accumulation_steps),
        num_train_epochs=float(rl.num_epochs),
        max_steps=int(rl.max_steps) if rl.max_steps > 0 else -1,
        # algorithm
        beta=float(rl.kl_coef),
        epsilon=float(rl.clip_eps),
        epsilon_high=float(rl.clip_eps_high) if rl.clip_eps_high is not None else None,
        loss_type=str(rl.loss_type),
        scale_rewards=str(rl.scale_rewards),
        num_iterations=int(rl.num_iterations),
        reward_weights=[float(w) for w in rl.reward_weights] if rl.reward_weights is not None else None,
        # rollouts
        num_generations=num_generations,
        num_generations_eval=int(rl.num_generations),
        max_completion_length=int(rl.max_completion_length),
        temperature=float(rl.temperature),
        top_p=float(rl.top_p),
        mask_truncated_completions=bool(rl.mask_truncated_completions),
        shuffle_dataset=True,
        remove_unused_columns=False,
        disable_dropout=True,  # as TRL 0.13's PPOTrainer (HuatuoGPT-o1): logprobs must not depend on dropout
        log_completions=False,  # medsft writes samples/ itself (no pandas/parquet dependency)
        # evaluation on the held-out questions
        eval_strategy="steps" if evaluate else "no",
        eval_steps=int(rl.eval_every_n_steps) if evaluate else None,
        per_device_eval_batch_size=int(rl.per_device_batch_size),
        # checkpoints and logs
        **save,
        save_total_limit=int(ck.max_ckpts),
        save_only_model=False,  # optimizer, scheduler and RNG too: resume continues exactly
        logging_steps=int(cfg.logging.every_n_steps),
        logging_first_step=True,
        report_to=_report_to(cfg),
        disable_tqdm=not bool(cfg.logging.progress_bar),
        # hardware
        use_cpu=cpu,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        activation_checkpointing=bool(cfg.model.gradient_checkpointing),  # transformers 5's name
        activation_checkpointing_kwargs={"use_reentrant": False} if cfg.model.gradient_checkpointing else None,
        deepspeed=deepspeed_config(cfg, precision),
        dataloader_num_workers=0,
    )
