"""A small benchmark eval of each saved checkpoint (checkpoint.eval_benchmark), logged beside the loss.

Generation and scoring are the evaluation module's (`medsft eval`), run in-process on the main process.
"""

from __future__ import annotations

import logging
from typing import Optional

from omegaconf import DictConfig

from medsft.eval.config import compose_eval_config
from medsft.eval.runner import evaluate_benchmark, load_preset_items

log = logging.getLogger("medsft.checkpoint_eval")


def checkpoint_eval_config(cfg: DictConfig) -> Optional[DictConfig]:
    """The `eval` node of the conf/eval preset checkpoint.eval_benchmark names, with this run's settings
    (checkpoint.eval_limit questions, checkpoint.eval_max_new_tokens, the generation check's batch size and
    the training system prompt); None when checkpoint evals are off."""
    preset = cfg.checkpoint.eval_benchmark
    if not preset:
        return None
    eval_cfg = compose_eval_config([f"eval={preset}"]).eval
    eval_cfg.limit = int(cfg.checkpoint.eval_limit)
    eval_cfg.max_new_tokens = int(cfg.checkpoint.eval_max_new_tokens)
    eval_cfg.batch_size = int(cfg.generation_check.batch_size)
    eval_cfg.system_prompt = cfg.data.system_prompt
    eval_cfg.progress = False
    return eval_cfg


def evaluate_checkpoint(ctx) -> dict | None:
    """Collective-safe: the main process generates, every process waits. Returns the metrics (main only)."""
    cfg, accelerator = ctx.cfg, ctx.accelerator
    preset = cfg.checkpoint.eval_benchmark
    if not preset:
        return None
    if cfg.deepspeed.enabled and cfg.deepspeed.zero_stage == 3:
        log.info("checkpoint eval skipped under ZeRO-3 (sharded weights); run `medsft eval` on the checkpoint")
        return None
    metrics = None
    if accelerator.is_main_process:
        if getattr(ctx, "checkpoint_eval", None) is None:
            eval_cfg = checkpoint_eval_config(cfg)
            ctx.checkpoint_eval = (eval_cfg, load_preset_items(eval_cfg))
        eval_cfg, items = ctx.checkpoint_eval
        model = accelerator.unwrap_model(ctx.model)
        with accelerator.autocast():  # the training precision, as the generation check
            metrics = evaluate_benchmark(model, ctx.tokenizer, items, eval_cfg)
        step = ctx.state.global_step
        figures = {k: metrics[k] for k in ("n", "accuracy", "unparsed_rate", "format_compliance") if k in metrics}
        ctx.metrics.write({"kind": "checkpoint_eval", "step": step, "benchmark": preset, **figures})
        ctx.tracker.log({f"eval/{preset}/{k}": v for k, v in figures.items()}, step=step)
        log.info("step %d: %s accuracy %.3f (unparsed %.1f%%, format %.0f%%) on %d questions", step, preset,
                 figures.get("accuracy", 0.0), 100 * figures.get("unparsed_rate", 0.0),
                 100 * figures.get("format_compliance", 0.0), figures.get("n", 0))
    accelerator.wait_for_everyone()
    return metrics
