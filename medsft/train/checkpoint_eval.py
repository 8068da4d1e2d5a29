"""A small benchmark eval of each saved checkpoint (checkpoint.eval_benchmark), logged beside the loss.

Generation and scoring are the evaluation module's (`medsft eval`), run in-process on the main process.
"""

from __future__ import annotations

import logging

log = logging.getLogger("medsft.checkpoint_eval")


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
        from medsft.eval.runner import evaluate_benchmark, load_preset_items

        items = getattr(ctx, "checkpoint_eval_items", None)
        if items is None:
            items = ctx.checkpoint_eval_items = load_preset_items(preset, limit=cfg.checkpoint.eval_limit)
        model = accelerator.unwrap_model(ctx.model)
        metrics = evaluate_benchmark(model, ctx.tokenizer, items, {
            "max_new_tokens": cfg.checkpoint.eval_max_new_tokens,
            "batch_size": cfg.generation_check.batch_size,
            "system_prompt": cfg.data.system_prompt,
        })
        step = ctx.state.global_step
        figures = {k: metrics[k] for k in ("n", "accuracy", "unparsed_rate", "format_compliance") if k in metrics}
        ctx.metrics.write({"kind": "checkpoint_eval", "step": step, "benchmark": preset, **figures})
        ctx.tracker.log({f"eval/{preset}/{k}": v for k, v in figures.items()}, step=step)
        log.info("step %d: %s accuracy %.3f (unparsed %.1f%%, format %.0f%%) on %d questions", step, preset,
                 figures.get("accuracy", 0.0), 100 * figures.get("unparsed_rate", 0.0),
                 100 * figures.get("format_compliance", 0.0), figures.get("n", 0))
    accelerator.wait_for_everyone()
    return metrics
