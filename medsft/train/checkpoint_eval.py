"""A small benchmark eval of each saved checkpoint (checkpoint.eval_benchmark), logged beside the loss.

Generation and scoring are the evaluation module's (`medsft eval`), run in-process on the main process; under
ZeRO-3 by a worker process on the checkpoint folder just saved (medsft.eval.worker).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from medsft.errors import MedsftError
from medsft.eval.config import compose_eval_config
from medsft.eval.runner import evaluate_benchmark, load_preset_items
from medsft.eval.worker import run_worker
from medsft.runtime.fsdp import is_fsdp
from medsft.train.generation_check import sharded_weights

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


def prepare_checkpoint_eval(cfg: DictConfig) -> Optional[tuple]:
    """At start-up: (eval node, items) of checkpoint.eval_benchmark, so a preset that cannot compose or whose
    data is missing fails before training, not at the first checkpoint; None when checkpoint evals are off.
    Under ZeRO-3 the items are checked here but the worker process loads its own (items None)."""
    if not cfg.checkpoint.eval_benchmark:
        return None
    try:
        eval_cfg = checkpoint_eval_config(cfg)
        items = load_preset_items(eval_cfg)
    except MedsftError as err:
        raise type(err)(f"checkpoint.eval_benchmark={cfg.checkpoint.eval_benchmark}: {err}") from err
    return eval_cfg, None if sharded_weights(cfg) else items


def evaluate_checkpoint(ctx, path: Optional[Path] = None) -> dict | None:
    """Collective-safe: the main process generates (under FSDP2 every process, in lockstep: each forward gathers
    the sharded weights), every process waits. Returns the metrics (main only).

    Under ZeRO-3 no process holds the whole model: the checkpoint just saved at `path` (full gathered weights)
    is evaluated by a worker process (medsft.eval.worker) while the training processes wait."""
    cfg, accelerator = ctx.cfg, ctx.accelerator
    preset = cfg.checkpoint.eval_benchmark
    if not preset:
        return None
    sharded = sharded_weights(cfg)
    generate_here = not sharded and (accelerator.is_main_process or is_fsdp(accelerator))
    metrics = None
    if ctx.checkpoint_eval is None and (accelerator.is_main_process or generate_here):
        ctx.checkpoint_eval = prepare_checkpoint_eval(cfg)
    if sharded and accelerator.is_main_process:
        metrics = _evaluate_in_worker(ctx, ctx.checkpoint_eval[0], path)
    elif generate_here:
        eval_cfg, items = ctx.checkpoint_eval
        with accelerator.autocast():  # the training precision, as the generation check
            metrics = evaluate_benchmark(accelerator.unwrap_model(ctx.model), ctx.tokenizer, items, eval_cfg)
    if accelerator.is_main_process and metrics is not None:
        step = ctx.state.global_step
        figures = {k: metrics[k] for k in ("n", "n_correct", "accuracy", "accuracy_ci95", "unparsed_rate",
                                           "format_compliance") if k in metrics}
        ctx.metrics.write({"kind": "checkpoint_eval", "step": step, "benchmark": preset, **figures})
        ctx.tracker.log({f"eval/{preset}/{k}": v for k, v in figures.items() if k != "accuracy_ci95"}, step=step)
        log.info("step %d: %s accuracy %.3f (unparsed %.1f%%, format %.0f%%) on %d questions", step, preset,
                 figures.get("accuracy", 0.0), 100 * figures.get("unparsed_rate", 0.0),
                 100 * figures.get("format_compliance", 0.0), figures.get("n", 0))
    accelerator.wait_for_everyone()
    return metrics if accelerator.is_main_process else None


def _evaluate_in_worker(ctx, eval_cfg: DictConfig, path: Optional[Path]) -> dict | None:
    if path is None:
        log.warning("checkpoint eval skipped: under ZeRO-3 it runs on the saved checkpoint, and none was given")
        return None
    log.info("checkpoint eval of %s: ZeRO-3 shards the weights, so a separate process evaluates the saved folder",
             Path(path).name)
    model_node = {**OmegaConf.to_container(ctx.cfg.model, resolve=True), "path": str(path), "name": Path(path).name}
    try:
        return run_worker({"task": "benchmark", "model": model_node,
                           "eval": OmegaConf.to_container(eval_cfg, resolve=True)})
    except (RuntimeError, OSError, ValueError) as err:  # a side eval never stops training
        log.warning("checkpoint eval of %s skipped: %s", Path(path).name, err)
        return None
