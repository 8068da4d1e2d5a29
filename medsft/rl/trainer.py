"""The RL stage, top to bottom: config -> questions -> policy + rewards -> TRL trainer -> checkpoints -> summary.

Built on TRL 1.16 (pinned: `trl==1.16.0`): `trl.GRPOTrainer` / `trl.GRPOConfig` drive generation, rewards,
the clipped surrogate, the KL term, checkpoints (HF format + tokenizer, `save_total_limit` rotation) and resume.
TRL 1.16 has no PPOTrainer (removed after 0.2x, not even in `trl.experimental`); `rl=ppo` runs
`medsft.rl.ppo.PPOTrainer`, a GRPOTrainer subclass with a value model and GAE (see that module).

Mapping from our config to TRL (everything else is TRL's default):
    rl.learning_rate / lr_scheduler / warmup_ratio / weight_decay / max_grad_norm -> the AdamW + schedule
    rl.kl_coef -> beta (GRPO: KL loss term; PPO: per-token KL penalty in the reward)
    rl.clip_eps (/ clip_eps_high) -> epsilon (/ epsilon_high);  rl.loss_type, rl.scale_rewards, rl.num_iterations
    rl.num_generations, max_completion_length, temperature, top_p, mask_truncated_completions -> rollouts
    rl.per_device_batch_size, gradient_accumulation_steps, num_epochs, max_steps -> the schedule
    seed, output_dir/experiment_name/rl_<algorithm>, checkpoint.* (every_n_steps, max_ckpts, save_final),
    resume.* (auto | never | path), logging.* (wandb offline/online/none, every_n_steps, progress bar),
    train.mixed_precision, model.gradient_checkpointing, launcher.cpu, deepspeed.* -> TrainingArguments

Outputs: checkpoints in `{output_dir}/{experiment_name}/rl_{algorithm}/checkpoint-N/` (+ `final/`), and in the run
folder `metrics.jsonl` (reward mean/std per reward function, format failure share, KL, entropy, completion length,
clip ratios, tokens/s, ...) and `samples/step_NNNNNN.jsonl` (sample generations every rl.samples_every_n_steps).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import TrainerCallback

from medsft.distributed import resolve_mixed_precision, use_cpu
from medsft.errors import ConfigError, DataError
from medsft.eval.format import check_format
from medsft.rl.config import validate_rl
from medsft.rl.rewards import completion_text

log = logging.getLogger("medsft.rl")

TRL_VERSION = "1.16.0"  # the version this module was written and tested against
CONFIG_FILE = "medsft_config.yaml"


def _trl_trainer_base():
    import trl

    if trl.__version__ != TRL_VERSION:
        log.warning("medsft.rl was built on trl==%s; trl %s is installed", TRL_VERSION, trl.__version__)
    return trl.GRPOTrainer


# --------------------------------------------------------------------------------------------- the trainer


@functools.lru_cache(maxsize=None)
def _make_grpo_trainer_class():
    GRPOTrainer = _trl_trainer_base()

    class MedsftGRPOTrainer(GRPOTrainer):
        """TRL's GRPOTrainer plus medsft's logging: format-failure share, tokens/s, sample generations."""

        def __init__(self, *args, run_dir: Optional[Path] = None, samples_every_n_steps: int = 0,
                     samples_per_write: int = 4, **kwargs):  # fmt: skip
            super().__init__(*args, **kwargs)
            self.run_dir = Path(run_dir) if run_dir is not None else None
            self.samples_every_n_steps = samples_every_n_steps
            self.samples_per_write = samples_per_write
            self._last_sample_step: Optional[int] = None
            self._tps_mark: Optional[tuple[float, float]] = None  # (tokens seen, time) at the last log
            self._last_scores_local: Optional[torch.Tensor] = None

        def _generate_and_score_completions(self, inputs):
            if self._tps_mark is None:  # tokens/s is measured from the first rollout on
                self._tps_mark = (float(self.state.num_input_tokens_seen), time.perf_counter())
            return super()._generate_and_score_completions(inputs)

        # Rewards: TRL computes them (our callables); we add the format-failure share and write samples.
        def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
            rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
            mode = "train" if self.model.training else "eval"
            device = rewards_per_func.device
            rank, n = self.accelerator.process_index, len(prompts)
            local = rewards_per_func[rank * n : (rank + 1) * n]
            weights = self.reward_weights.to(device)
            scores = (local * weights.unsqueeze(0)).nansum(dim=1)
            scores[torch.isnan(local).all(dim=1)] = 0.0
            self._last_scores_local = scores
            checks = [check_format(completion_text(c)) for c in completions]
            failed = torch.tensor([0.0 if c.compliant else 1.0 for c in checks], device=device)
            self._metrics[mode]["format/failure_rate"].append(self.accelerator.gather(failed).mean().item())
            if mode == "train":
                self._maybe_write_samples(inputs, completions, checks, local)
            return rewards_per_func

        def _maybe_write_samples(self, inputs, completions, checks, local_rewards) -> None:
            every = self.samples_every_n_steps
            step = self.state.global_step
            if not every or self.run_dir is None or not self.accelerator.is_main_process:
                return
            if self._last_sample_step is not None and step - self._last_sample_step < every:
                return
            self._last_sample_step = step
            out = self.run_dir / "samples"
            out.mkdir(parents=True, exist_ok=True)
            with open(out / f"step_{step:06d}.jsonl", "w", encoding="utf-8") as f:
                for i in range(min(self.samples_per_write, len(completions))):
                    row = inputs[i]
                    f.write(json.dumps({
                        "step": step,
                        "record": row.get("record"),
                        "question": row.get("question"),
                        "reference": row.get("reference"),
                        "completion": completion_text(completions[i]),
                        "format_ok": checks[i].compliant,
                        "format_reason": checks[i].reason,
                        "rewards": {name: _finite(local_rewards[i, j].item())
                                    for j, name in enumerate(self.reward_func_names)},
                    }, ensure_ascii=False) + "\n")  # fmt: skip

        def log(self, logs: dict, start_time: Optional[float] = None) -> None:
            if self.model.training and self._tps_mark is not None and "loss" in logs:
                seen, now = float(self.state.num_input_tokens_seen), time.perf_counter()
                tokens = self._metrics["train"].get("num_tokens")
                seen = float(tokens[-1]) if tokens else seen
                if now > self._tps_mark[1]:
                    logs["tokens_per_s"] = (seen - self._tps_mark[0]) / (now - self._tps_mark[1])
                self._tps_mark = (seen, now)
            super().log(logs, start_time)

    return MedsftGRPOTrainer


def _finite(value: float) -> Optional[float]:
    return value if math.isfinite(value) else None


class MetricsFileCallback(TrainerCallback):
    """Every log (kind "train" or "eval") appended to `<run dir>/metrics.jsonl` (medsft.train.metrics.MetricsFile,
    as SFT) on the main process; `records` keeps them for the summary and the plot."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.file = None

    @property
    def records(self) -> list[dict]:
        return self.file.records if self.file is not None else []

    def on_log(self, args, state, control, logs=None, **kwargs):
        from medsft.train.metrics import MetricsFile

        if not logs:
            return
        if self.file is None:
            self.file = MetricsFile(self.path, enabled=state.is_world_process_zero)
        kind = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        row: dict = {"kind": kind, "step": state.global_step, "epoch": state.epoch}
        for key, value in logs.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                row[key] = _finite(float(value))
        self.file.write(row)


def plot_rl_curves(records: list[dict], out_path: Path) -> Optional[Path]:
    """PNG of the mean reward (total and per reward function), format failures and KL against the step."""
    train = [r for r in records if r.get("kind") == "train" and r.get("reward") is not None]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in train]
    fig, (ax_r, ax_k) = plt.subplots(1, 2, figsize=(11, 4))
    ax_r.plot(steps, [r["reward"] for r in train], label="reward (weighted sum)", linewidth=2)
    for key in sorted({k for r in train for k in r if k.startswith("rewards/") and k.endswith("/mean")}):
        ax_r.plot(steps, [r.get(key) for r in train], label=key[len("rewards/"):-len("/mean")], alpha=0.7)
    ax_r.plot(steps, [r.get("format/failure_rate") for r in train], label="format failures", linestyle="--")
    ax_r.set_xlabel("step")
    ax_r.legend(fontsize=8)
    ax_k.plot(steps, [r.get("kl") for r in train], label="KL (per token)")
    ax_k.plot(steps, [r.get("entropy") for r in train], label="entropy")
    ax_k.set_xlabel("step")
    ax_k.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path, dpi=90)
    plt.close(fig)
    return Path(out_path)


class ConfigSnapshotCallback(TrainerCallback):
    """Writes the resolved config into every checkpoint (`medsft_config.yaml`), for resume checks and provenance."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg

    def on_train_begin(self, args, state, control, **kwargs):
        # transformers' WandbCallback (registered before ours) has started the run: add our config to it.
        if state.is_world_process_zero and "wandb" in (args.report_to or []):
            import wandb

            from medsft.config import to_plain_dict
            from medsft.tracking import redact

            if wandb.run is not None:
                wandb.config.update({"medsft": redact(to_plain_dict(self.cfg))}, allow_val_change=True)

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            OmegaConf.save(self.cfg, folder / CONFIG_FILE, resolve=True)


# --------------------------------------------------------------------------------------------- setup


def rl_output_dir(cfg: DictConfig) -> Path:
    return Path(cfg.output_dir).expanduser().resolve() / cfg.experiment_name / f"rl_{cfg.rl.algorithm}"


def _checkpoints(out_dir: Path) -> list[Path]:
    found = []
    if out_dir.is_dir():
        for child in out_dir.iterdir():
            if child.is_dir() and child.name.startswith("checkpoint-") and child.name[11:].isdigit():
                if (child / "trainer_state.json").is_file():  # written last by transformers' _save_checkpoint
                    found.append((int(child.name[11:]), child))
    return [p for _, p in sorted(found)]


def find_resume_checkpoint(cfg: DictConfig, out_dir: Path) -> Optional[str]:
    """resume.from_checkpoint: auto (newest complete checkpoint-N here, if any) | never | a checkpoint path."""
    choice = str(cfg.resume.from_checkpoint).strip()
    existing = _checkpoints(out_dir)
    if choice.lower() in ("never", "false", "no", "none", ""):
        if existing and not cfg.resume.overwrite:
            raise ConfigError(
                f"resume.from_checkpoint={choice!r} but {out_dir} already holds {len(existing)} checkpoint(s) (newest "
                f"{existing[-1].name}); pass resume.overwrite=true to start fresh there, or change experiment_name / "
                "output_dir"
            )
        return None
    if choice.lower() == "auto":
        path = existing[-1] if existing else None
    else:
        path = Path(choice).expanduser()
        if not (path / "trainer_state.json").is_file():
            raise ConfigError(f"resume.from_checkpoint={choice}: not a complete RL checkpoint (no trainer_state.json)")
    if path is not None:
        check_resume_config(cfg, path)
    return str(path) if path is not None else None


# Keys that may change when a run is continued (a longer run, other logging); anything else must match.
_RESUMABLE_CHANGES = {"max_steps", "num_epochs", "eval_every_n_steps", "samples_every_n_steps", "samples_per_write"}


def run_fingerprint(cfg: DictConfig) -> dict:
    """The flattened `rl` group (minus resumable changes), model.path and seed."""
    flat: dict = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}.{key}", value)
        else:
            flat[prefix] = node

    rl = OmegaConf.to_container(cfg.rl, resolve=True)
    walk("rl", {k: v for k, v in rl.items() if k not in _RESUMABLE_CHANGES})
    flat.update({"model.path": cfg.model.path, "seed": cfg.seed})
    return flat


def check_resume_config(cfg: DictConfig, checkpoint: Path) -> None:
    """Refuse to resume a checkpoint written under a different RL config (unless resume.allow_config_change)."""
    saved_path = Path(checkpoint) / CONFIG_FILE
    if not saved_path.is_file() or cfg.resume.allow_config_change:
        return
    saved = OmegaConf.load(saved_path)
    if OmegaConf.select(saved, "rl") is None:
        return
    before, now = run_fingerprint(saved), run_fingerprint(cfg)
    diffs = [f"{k}: checkpoint {before.get(k)!r} != now {now.get(k)!r}"
             for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]  # fmt: skip
    if diffs:
        raise ConfigError(
            f"cannot resume exactly from {checkpoint}: the run differs in\n  - " + "\n  - ".join(diffs)
            + "\npass resume.allow_config_change=true to continue anyway, or resume.from_checkpoint=never "
            "resume.overwrite=true to start over"
        )


def deepspeed_config(cfg: DictConfig, mixed_precision: str) -> Optional[dict]:
    """The `deepspeed` group as TrainingArguments' DeepSpeed dict (medsft.deepspeed_config.deepspeed_json).

    RL's batch sizes and clipping live in rl.*, so they are left "auto": transformers fills them from the
    TrainingArguments built here.
    """
    if not cfg.deepspeed.enabled:
        return None
    from medsft.deepspeed_config import deepspeed_json

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
    from trl import GRPOConfig

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


def _system_prompt(cfg: DictConfig) -> Optional[str]:
    sp = cfg.rl.data.system_prompt
    return sp if sp is not None else OmegaConf.select(cfg, "data.system_prompt", default=None)


def load_policy_tokenizer(cfg: DictConfig):
    """The tokenizer of model.path with the chat template SFT rendered with (medsft.data.render)."""
    from medsft.data.render import ensure_chat_template
    from medsft.models import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    ensure_chat_template(tokenizer)
    return tokenizer


def load_policy(cfg: DictConfig, tokenizer, system_prompt: Optional[str]):
    """The policy of model.path, stopping where SFT taught it to stop (the template's end-of-turn token + eos)."""
    from medsft.data.render import end_of_turn_ids
    from medsft.models import load_model

    dtype = {"auto": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    model = load_model(cfg.model, dtype=dtype[cfg.model.dtype])  # "auto": fp32 master weights, as SFT
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        raise ConfigError(
            f"model.path={cfg.model.path}: its tokenizer has no chat template, so medsft assigned one and added "
            "special tokens the model lacks; start RL from the SFT checkpoint, whose tokenizer carries the training "
            "template"
        )
    stops = model.generation_config.eos_token_id
    stops = [] if stops is None else ([stops] if isinstance(stops, int) else list(stops))
    for token in end_of_turn_ids(tokenizer, system_prompt) + [tokenizer.eos_token_id]:
        if token is not None and token not in stops:
            stops.append(token)
    model.generation_config.eos_token_id = stops
    return model


def load_value_model(cfg: DictConfig, dtype: torch.dtype):
    """PPO's value model: AutoModelForSequenceClassification (num_labels=1), its backbone scored per token."""
    from transformers import AutoModelForSequenceClassification

    from medsft.errors import ModelSourceError
    from medsft.models import resolve_model_dir

    source = cfg.rl.ppo.value_model_path or cfg.model.path
    path = resolve_model_dir(str(source), OmegaConf.select(cfg, "model.cache_dir"), OmegaConf.select(cfg, "model.tiny"))
    try:
        return AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, dtype=dtype, trust_remote_code=bool(cfg.model.trust_remote_code)
        )
    except OSError as err:
        raise ModelSourceError(f"rl.ppo.value_model_path={source}: cannot load it ({err})") from err


def _prepare_questions(cfg: DictConfig, data, tokenizer, system_prompt: Optional[str]):
    """Train / eval datasets of conversational prompts, dropping prompts over rl.data.max_prompt_len tokens."""
    from medsft.rl.data import filter_long_prompts, to_dataset

    limit = int(cfg.rl.data.max_prompt_len)
    train, train_prompts, dropped = filter_long_prompts(data.train, tokenizer, system_prompt, limit)
    held, held_prompts, dropped_eval = filter_long_prompts(data.eval, tokenizer, system_prompt, limit)
    if dropped or dropped_eval:
        log.warning("dropped %d train / %d eval questions with a prompt over rl.data.max_prompt_len=%d tokens",
                    dropped, dropped_eval, limit)  # fmt: skip
    if not train:
        raise DataError(f"{data.path}: no training questions left (all {len(data.train)} prompts exceed "
                        f"rl.data.max_prompt_len={limit} tokens)")  # fmt: skip
    return to_dataset(train, train_prompts), (to_dataset(held, held_prompts) if held else None)


def build_trainer(cfg: DictConfig, run_dir: Path, extra_callbacks: Optional[list] = None):
    """Everything up to (not including) `train()`: returns (trainer, output dir, metrics callback)."""
    from medsft.rl.rewards import build_reward_functions

    from medsft.rl.data import load_rl_data

    rl = cfg.rl
    system_prompt = _system_prompt(cfg)
    data = load_rl_data(rl.data, seed=int(cfg.seed))  # every record validated before any model work
    log.info("%s", data.summary())
    tokenizer = load_policy_tokenizer(cfg)
    train_ds, eval_ds = _prepare_questions(cfg, data, tokenizer, system_prompt)
    model = load_policy(cfg, tokenizer, system_prompt)
    out_dir = rl_output_dir(cfg)
    args = build_grpo_args(cfg, out_dir, has_eval=eval_ds is not None)
    rewards = build_reward_functions(rl, device=args.device, trust_remote_code=bool(cfg.model.trust_remote_code))
    metrics_cb = MetricsFileCallback(Path(run_dir) / "metrics.jsonl")
    common = dict(
        model=model,
        reward_funcs=rewards,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds if args.eval_strategy != "no" else None,
        processing_class=tokenizer,
        callbacks=[metrics_cb, ConfigSnapshotCallback(cfg), *(extra_callbacks or [])],
        run_dir=run_dir,
        samples_every_n_steps=int(rl.samples_every_n_steps),
        samples_per_write=int(rl.samples_per_write),
    )
    if rl.algorithm == "ppo":
        from medsft.rl.ppo import make_ppo_trainer_class

        value_model = load_value_model(cfg, model.dtype)
        trainer_cls = make_ppo_trainer_class(_make_grpo_trainer_class())
        trainer = trainer_cls(**common, value_model=value_model, ppo_cfg=rl.ppo,
                              rollout_num_generations=int(rl.num_generations))  # fmt: skip
    else:
        trainer = _make_grpo_trainer_class()(**common)
    return trainer, out_dir, metrics_cb


def _save_final(trainer, out_dir: Path, cfg: DictConfig) -> Optional[Path]:
    if not cfg.checkpoint.save_final:
        return None
    final = out_dir / "final"
    trainer.save_model(str(final))  # HF weights + tokenizer (processing_class); ZeRO-3 weights gathered by HF
    if trainer.accelerator.is_main_process:
        OmegaConf.save(cfg, final / CONFIG_FILE, resolve=True)
    trainer.accelerator.wait_for_everyone()
    return final


def summarize(records: list[dict], key: str = "reward", window: int = 3) -> dict:
    """Mean `key` over the first and the last `window` train logs."""
    values = [row[key] for row in records if row.get("kind") == "train" and row.get(key) is not None]
    if not values:
        return {}
    w = max(1, min(window, len(values) // 2 or 1))
    return {f"{key}/first": sum(values[:w]) / w, f"{key}/last": sum(values[-w:]) / w, "logs": len(values)}


def train_rl(cfg: DictConfig, run_dir: Path) -> Optional[float]:
    """The RL stage (stage=rl). Returns the sweep objective: the mean reward of the last logged steps."""
    validate_rl(cfg)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    out_dir = rl_output_dir(cfg)
    resume = find_resume_checkpoint(cfg, out_dir)
    trainer, out_dir, metrics_cb = build_trainer(cfg, run_dir)
    if trainer.accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, run_dir / CONFIG_FILE, resolve=True)
    log.info("RL (%s) from %s: checkpoints in %s%s", cfg.rl.algorithm, cfg.model.path, out_dir,
             f", resuming from {resume}" if resume else "")  # fmt: skip
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume)
    final = _save_final(trainer, out_dir, cfg)
    summary = summarize(metrics_cb.records)
    summary.update({"seconds": round(time.perf_counter() - start, 1), "global_step": trainer.state.global_step,
                    "final": str(final) if final else None, "output_dir": str(out_dir)})  # fmt: skip
    if trainer.accelerator.is_main_process:
        (run_dir / "rl_summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        if cfg.logging.plot:
            plot_rl_curves(metrics_cb.records, run_dir / "rl_curves.png")
        log.info("RL done: %s", summary)
    objective = summary.get("reward/last")
    _cleanup(trainer)
    return objective


def _cleanup(trainer) -> None:
    import gc

    accelerator = trainer.accelerator
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    del trainer
    gc.collect()
