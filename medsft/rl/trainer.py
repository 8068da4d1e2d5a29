"""The RL stage, top to bottom: config -> questions -> policy + rewards -> TRL trainer -> checkpoints -> summary.

Built on TRL 1.16 (pinned: `trl==1.16.0`, the `rl` extra): `trl.GRPOTrainer` / `trl.GRPOConfig` drive
generation, rewards, the clipped surrogate, the KL term, checkpoints (HF format + tokenizer, `save_total_limit`
rotation) and resume. TRL 1.16 has no PPOTrainer (removed after 0.2x, not even in `trl.experimental`); `rl=ppo`
runs `medsft.rl.ppo.PPOTrainer`, a GRPOTrainer subclass with a value model and GAE (see that module).

The rooms of the stage: args.py (our config -> GRPOConfig), trl_glue.py (medsft's trainer subclass and callbacks),
policy.py (policy, tokenizer, value model), data.py (verifiable questions), rewards.py, resume.py, ppo.py.

Outputs: checkpoints in `{output_dir}/{experiment_name}/rl_{algorithm}/checkpoint-N/` (+ `final/`), and in the run
folder `metrics.jsonl` (medsft.outputs: reward mean/std per reward function, format failure share, KL, entropy,
completion length, clip ratios, tokens/s, ..., and a closing summary record with the objective),
`rl_summary.json`, `rl_curves.png` and `samples/step_NNNNNN.jsonl` (sample generations every
rl.samples_every_n_steps).
"""

from __future__ import annotations

import gc
import json
import logging
import time
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from medsft.config import validate_rl
from medsft.errors import DataError
from medsft.plots import plot_rl_curves
from medsft.rl.args import build_grpo_args
from medsft.rl.data import filter_long_prompts, load_rl_data, to_dataset
from medsft.rl.policy import load_policy, load_policy_tokenizer, load_value_model, policy_peft_config
from medsft.rl.ppo import make_ppo_trainer_class
from medsft.rl.resume import find_rl_checkpoint, rl_output_dir
from medsft.rl.rewards import build_reward_functions
from medsft.rl.trl_glue import CONFIG_FILE, ConfigSnapshotCallback, MedsftGRPOTrainer, MetricsFileCallback

log = logging.getLogger("medsft.rl")


def _system_prompt(cfg: DictConfig) -> Optional[str]:
    sp = cfg.rl.data.system_prompt
    return sp if sp is not None else cfg.data.system_prompt


def _prepare_questions(cfg: DictConfig, data, tokenizer, system_prompt: Optional[str]):
    """Train / eval datasets of conversational prompts, dropping prompts over rl.data.max_prompt_len tokens."""
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
    rl = cfg.rl
    system_prompt = _system_prompt(cfg)
    data = load_rl_data(rl.data, seed=int(cfg.seed))  # every record validated before any model work
    log.info("%s", data.summary())
    tokenizer = load_policy_tokenizer(cfg)
    train_ds, eval_ds = _prepare_questions(cfg, data, tokenizer, system_prompt)
    model = load_policy(cfg, tokenizer, system_prompt)
    peft_config = policy_peft_config(cfg, model)  # peft.enabled: TRL trains a LoRA/DoRA adapter on the policy
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
        peft_config=peft_config,
    )
    if rl.algorithm == "ppo":
        value_model = load_value_model(cfg, model.dtype)
        trainer_cls = make_ppo_trainer_class(MedsftGRPOTrainer)
        trainer = trainer_cls(**common, value_model=value_model, ppo_cfg=rl.ppo,
                              rollout_num_generations=int(rl.num_generations))  # fmt: skip
    else:
        trainer = MedsftGRPOTrainer(**common)
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
    resume = find_rl_checkpoint(cfg, out_dir)
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
    objective = summary.get("reward/last")
    metrics_cb.write_summary(summary, objective, trainer.accelerator.is_main_process)
    if trainer.accelerator.is_main_process:
        (run_dir / "rl_summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        if cfg.logging.plot:
            plot_rl_curves(metrics_cb.records, run_dir / "rl_curves.png", title=cfg.experiment_name)
        log.info("RL done: %s", summary)
    _cleanup(trainer)
    return objective


def _cleanup(trainer) -> None:
    accelerator = trainer.accelerator
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    del trainer
    gc.collect()
