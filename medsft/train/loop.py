"""The SFT recipe, top to bottom: setup -> (before check) -> train -> (after check) -> save -> cleanup.

Gradient accumulation is handled here rather than by `accelerator.accumulate`: the loss of an optimizer
step is normalised by the number of loss tokens of the WHOLE step (all micro-batches, all processes), and
an epoch's last, shorter accumulation group still steps. Both need the step's extent known up front, which
the deterministic data order (medsft.data.order) gives.
"""

from __future__ import annotations

import gc
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
from accelerate.utils import set_seed
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from tqdm.auto import tqdm

from medsft.compute.attention import real_tokens, segment_lengths
from medsft.compute.flops import ModelFlops, device_peak_flops
from medsft.compute.kernels import forward_loss_sums, setup_kernels
from medsft.config import to_plain_dict
from medsft.config.secrets import redact
from medsft.data.dataset import SFTData, build_sft_data
from medsft.data.mixture import data_record
from medsft.data.order import DataOrder, StepPlan
from medsft.data.render import ensure_chat_template
from medsft.errors import DataError, TrainingDiverged
from medsft.models import apply_peft, load_model, load_tokenizer, training_dtype
from medsft.outputs import MetricsFile
from medsft.plots import plot_curves
from medsft.runtime.accelerator import (build_accelerator, describe_mixed_precision, loss_scale_for,
                                        micro_batch_sync, prepare_model_and_optimizer)
from medsft.runtime.allocator import set_cpu_malloc_policy
from medsft.runtime.deepspeed import deepspeed_step_applied, nonfinite_backward_loss
from medsft.runtime.quiet import quiet_checkpoint_save
from medsft.testing import faults  # TEST-ONLY fault injection hooks, inert unless $MEDSFT_TEST_FAULTS is set
from medsft.testing.debug_dump import write_debug_dump  # TEST-ONLY, a no-op unless $MEDSFT_DEBUG_DUMP is set
from medsft.tracking import HubPusher, Tracker, command_line, model_card
from medsft.train import checkpoint as ckpt
from medsft.train.adapter_checkpoint import merge_final, pushes_merged_only
from medsft.train.adapter_checkpoint import register_state_hooks as register_adapter_state_hooks
from medsft.train.checkpoint_eval import evaluate_checkpoint, prepare_checkpoint_eval
from medsft.train.generation_check import run_generation_check
from medsft.train.metrics import MetricWindow
from medsft.train.optim import build_optimizer, build_scheduler, lr_multiplier
from medsft.train.resume import maybe_resume, report_complete, restore_rng
from medsft.train.runstats import COST_KEYS, RunStats, cost_lines, rate
from medsft.train.signals import PreemptionHandler
from medsft.train.state import TrainState, run_fingerprint

log = logging.getLogger("medsft.train")


@dataclass
class RunContext:
    """Everything the steps share; built once by `setup`."""

    cfg: DictConfig
    run_dir: Path
    ckpt_root: Path
    accelerator: object
    model: object
    tokenizer: object
    optimizer: object
    scheduler: object
    data: SFTData
    order: DataOrder  # what each process iterates, and its collator (medsft.data.order)
    plan: StepPlan
    state: TrainState
    tracker: Tracker
    metrics: MetricsFile
    pusher: Optional[HubPusher] = None
    loss_scale: float = 1.0
    kernels: object = None  # medsft.compute.kernels.Kernels
    model_flops: Optional[ModelFlops] = None
    peak_flops: Optional[float] = None
    generation_before: Optional[dict] = None  # the generation check's answers before training
    checkpoint_eval: Optional[tuple] = None  # (eval node, items) of checkpoint.eval_benchmark, loaded once
    stats: Optional[RunStats] = None  # wall time, throughput, peak memory (medsft.train.runstats)


# ----------------------------------------------------------------------------------------------- setup


def checkpoint_root(cfg: DictConfig) -> Path:
    return Path(cfg.output_dir).expanduser().resolve() / cfg.experiment_name


def setup(cfg: DictConfig, run_dir: Path) -> RunContext:
    accelerator = build_accelerator(cfg)
    set_seed(cfg.seed)
    is_main = accelerator.is_main_process
    checkpoint_eval = prepare_checkpoint_eval(cfg)  # checkpoint.eval_benchmark resolved now, not at a checkpoint
    log.info("processes: %d, device: %s, mixed precision: %s", accelerator.num_processes, accelerator.device,
             describe_mixed_precision(cfg, accelerator.device.type == "cpu"))
    # before the data and the model load, so that their buffers follow it too
    log.info("allocator: %s", set_cpu_malloc_policy(cfg.train.cpu_malloc_mmap_threshold_mb, accelerator.device.type))

    tokenizer = load_tokenizer(cfg.model)
    ensure_chat_template(tokenizer)
    with accelerator.main_process_first():
        data = build_sft_data(cfg.data, tokenizer, seed=cfg.seed)
    if not data.train:
        raise DataError(f"no training examples left in {cfg.data.path} after validation and length filtering")
    order = DataOrder.from_config(cfg.data, data.train, cfg.seed, tokenizer.pad_token_id)  # padded | grouped | packed
    plan = order.plan(cfg.train.train_bsz_per_gpu, cfg.train.gradient_accumulation_steps, accelerator.num_processes,
                      cfg.train.n_epochs, cfg.train.max_steps)

    # "auto": fp32 master weights (mixed precision does the rest); a frozen base under LoRA in bf16: bf16
    dtype = training_dtype(cfg.model.dtype, cfg.peft, accelerator.mixed_precision,
                           sharded=bool(cfg.deepspeed.enabled or cfg.fsdp.enabled))
    if dtype == torch.bfloat16 and cfg.model.dtype == "auto" and cfg.peft.enabled:
        log.info("frozen base model in bf16 (model.dtype=auto, peft=%s, bf16 mixed precision), the adapter in fp32; "
                 "model.dtype=float32 keeps an fp32 base", cfg.peft.name)
    # embeddings grow for the tokens the template added; peft.load_in_4bit: a 4-bit base (QLoRA)
    model = load_model(cfg.model, dtype=dtype, tokenizer=tokenizer, peft_cfg=cfg.peft)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    model = apply_peft(model, cfg.peft, cfg.model.gradient_checkpointing)  # peft.enabled: only the adapter trains
    kernels = setup_kernels(model, cfg.model, accelerator.device, packing=order.mode == "packed",
                            grouped=order.mode == "grouped",
                            zero3=bool(cfg.deepspeed.enabled and cfg.deepspeed.zero_stage == 3))
    model_flops = ModelFlops.of(model)
    optimizer = build_optimizer(model, cfg.optimizer)
    model, optimizer = prepare_model_and_optimizer(accelerator, cfg, model, optimizer)  # DDP | ZeRO | FSDP2
    register_adapter_state_hooks(accelerator, model)  # an adapter run's training state leaves the frozen base out
    # Built on the prepared optimizer: ZeRO rebuilds the param groups it steps (ZeRO-3 drops empty ones).
    scheduler = build_scheduler(optimizer, cfg.optimizer, plan)
    # Checkpointed by save_state (never stepped by accelerate: we step it once per optimizer step).
    accelerator.register_for_checkpointing(scheduler)

    return RunContext(
        cfg=cfg, run_dir=run_dir, ckpt_root=checkpoint_root(cfg), accelerator=accelerator, model=model,
        tokenizer=tokenizer, optimizer=optimizer, scheduler=scheduler, data=data, order=order, plan=plan,
        state=TrainState(), tracker=Tracker(cfg.logging.backend, enabled=is_main),
        metrics=MetricsFile(run_dir / "metrics.jsonl", enabled=is_main),
        pusher=HubPusher(cfg.hf_repo_id, private=cfg.hub_private) if (cfg.push_to_hub and is_main) else None,
        loss_scale=loss_scale_for(accelerator), kernels=kernels, model_flops=model_flops,
        peak_flops=device_peak_flops(accelerator.device, accelerator.mixed_precision, dtype),
        checkpoint_eval=checkpoint_eval,
    )


# ----------------------------------------------------------------------------------------------- steps


def _to_device(batch: dict, device) -> dict:
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


def _all_sum(ctx: RunContext, value: float) -> float:
    if ctx.accelerator.num_processes == 1:
        return float(value)
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=ctx.accelerator.device)
    return float(ctx.accelerator.reduce(tensor, reduction="sum").item())


def optimizer_step(ctx: RunContext, group: list[list[int]], window: MetricWindow) -> bool:
    """Forward/backward every micro-batch of one optimizer step, then step. Returns False if skipped."""
    accelerator, model = ctx.accelerator, ctx.model
    batches = [ctx.order.collate([ctx.data.train[i] for i in indices]) for indices in group]
    local_loss_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    step_loss_tokens = _all_sum(ctx, local_loss_tokens)
    finite = True
    for position, batch in enumerate(batches):
        is_last = position == len(batches) - 1
        # Only the step's last micro-batch synchronises gradients (DDP all-reduce, DeepSpeed boundary; FSDP2
        # reduce-scatters every micro-batch).
        accelerator.sync_gradients = is_last
        batch = _to_device(batch, accelerator.device)
        with micro_batch_sync(accelerator, model, is_last):
            with accelerator.autocast():
                # padded or packed batch, through the configured attention / loss kernels (medsft.compute.kernels)
                loss_sum, loss_tokens, correct = forward_loss_sums(model, batch, ctx.kernels)
                loss_sum = faults.on_micro_batch(loss_sum, ctx.state.global_step + 1, is_last)  # TEST-ONLY
            # Any process with a non-finite loss makes every process skip the step (same decision everywhere).
            finite = finite and _all_sum(ctx, 0.0 if torch.isfinite(loss_sum) else 1.0) == 0.0
            if finite:
                # Per-token mean over the whole step; DDP/DeepSpeed average over processes and accelerate
                # divides by the accumulation steps, which loss_scale undoes.
                accelerator.backward(loss_sum / max(step_loss_tokens, 1.0) * ctx.loss_scale)
            elif ctx.cfg.deepspeed.enabled:  # DeepSpeed needs every backward; NaN grads make it skip the step
                accelerator.backward(nonfinite_backward_loss(loss_sum / max(step_loss_tokens, 1.0)))
        window.add_micro_batch(
            loss_sum=loss_sum.item() if finite else 0.0,
            loss_tokens=int(loss_tokens) if finite else 0,
            correct=int(correct) if finite else 0,
            tokens=real_tokens(batch),
            samples=batch.get("num_examples", batch["input_ids"].size(0)),
            padded_tokens=batch["input_ids"].numel(),
            flops=ctx.model_flops.training_flops(real_tokens(batch), segment_lengths(batch)) if ctx.model_flops else 0,
        )
    state = ctx.state
    grad_norm = None
    if ctx.cfg.deepspeed.enabled:  # DeepSpeed stepped in the last backward, skipping non-finite gradients itself
        finite = deepspeed_step_applied(model, finite)
        if finite and hasattr(model, "get_global_grad_norm"):
            grad_norm = model.get_global_grad_norm()
    elif finite:
        # Clipping also measures the norm (max_grad_norm<=0: measured, not clipped); a finite loss can still
        # give non-finite gradients, and those must not reach the optimizer either.
        max_norm = ctx.cfg.optimizer.max_grad_norm
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_norm if max_norm and max_norm > 0 else math.inf)
        finite = grad_norm is None or math.isfinite(float(grad_norm))
    if not finite:
        ctx.optimizer.zero_grad(set_to_none=True)
        state.skipped_steps += 1
        state.consecutive_skips += 1
        window.skipped += 1
        log.warning("step %d: non-finite loss or gradients, step skipped (%d in a row)", state.global_step + 1,
                    state.consecutive_skips)
        if state.consecutive_skips >= ctx.cfg.train.max_consecutive_skips:
            raise TrainingDiverged(
                f"{state.consecutive_skips} consecutive optimizer steps had a non-finite loss or gradients "
                f"(train.max_consecutive_skips={ctx.cfg.train.max_consecutive_skips}); the last good checkpoint "
                f"is kept in {ctx.ckpt_root}"
            )
    else:
        window.grad_norms.append(float(grad_norm) if grad_norm is not None else None)
        ctx.optimizer.step()
        ctx.optimizer.zero_grad(set_to_none=True)
        state.consecutive_skips = 0
    ctx.scheduler.step()
    state.global_step += 1
    state.step_in_epoch += 1
    state.samples_seen += int(_all_sum(ctx, sum(len(i) for i in group)))
    return finite


@torch.no_grad()
def validation_loss(ctx: RunContext) -> Optional[float]:
    """Token-weighted loss over the held-out split, every process taking an equal number of batches."""
    val = ctx.data.val
    if not val:
        return None
    accelerator, world, rank = ctx.accelerator, ctx.accelerator.num_processes, ctx.accelerator.process_index
    bsz = ctx.cfg.train.train_bsz_per_gpu
    shard = list(range(rank, len(val), world))
    n_batches = math.ceil(math.ceil(len(val) / world) / bsz)
    model = ctx.model
    was_training = model.training
    model.eval()
    loss_sum, loss_tokens = 0.0, 0.0
    for b in range(n_batches):
        indices = shard[b * bsz : (b + 1) * bsz]
        # A process with nothing left runs one weightless example so collectives (ZeRO-3) stay in step.
        examples = [val[i] for i in indices] or [dict(val[0], labels=[-100] * len(val[0]["labels"]))]
        batch = _to_device(ctx.order.collate(examples), accelerator.device)
        with accelerator.autocast():
            part_loss, part_tokens, _ = forward_loss_sums(model, batch, ctx.kernels)
        loss_sum += float(part_loss)
        loss_tokens += float(part_tokens)
    if was_training:
        model.train()
    total_loss, total_tokens = _all_sum(ctx, loss_sum), _all_sum(ctx, loss_tokens)
    return total_loss / total_tokens if total_tokens else None


def log_window(ctx: RunContext, window: MetricWindow, epoch_float: float) -> dict:
    figures = window.reduce(ctx.accelerator, peak_flops=ctx.peak_flops)
    state = ctx.state
    record = {
        "kind": "train",
        "step": state.global_step,
        "epoch": round(epoch_float, 4),
        "lr": ctx.scheduler.get_last_lr()[0] if state.global_step == 0 else _lr_of_last_step(ctx),
        "skipped_total": state.skipped_steps,
        "samples_seen": state.samples_seen,
        **figures,
    }
    state.last_loss = figures["loss"]
    ctx.metrics.write(record)
    ctx.tracker.log(record, step=state.global_step)
    return record


def _lr_of_last_step(ctx: RunContext) -> float:
    """LR that the step just taken used (the scheduler has already moved on to the next one)."""
    plan, opt = ctx.plan, ctx.cfg.optimizer
    factor = lr_multiplier(ctx.state.global_step - 1, plan.total_steps, plan.warmup_steps(opt.warmup_rates),
                           opt.scheduler, opt.min_lr_ratio)
    return opt.learning_rate * factor


def save(ctx: RunContext, epoch: int, window: Optional[MetricWindow] = None) -> Path:
    """Collective. `window`: the metric window not yet logged (saved so a resume logs the same figures)."""
    state = ctx.state
    if ctx.tracker.run_id:
        state.wandb_run_id = ctx.tracker.run_id
    with quiet_checkpoint_save():  # no "Writing model shards" progress bar at every checkpoint
        path = ckpt.save_checkpoint(
            ctx.accelerator, ctx.model, ctx.tokenizer, ctx.ckpt_root, epoch, state.global_step,
            trainer_state={**asdict(state), "plan": asdict(ctx.plan),
                           "fingerprint": run_fingerprint(ctx.cfg, ctx.data, ctx.accelerator.num_processes),
                           "metric_window": window.saved_state(ctx.accelerator) if window is not None else None},
            cfg=ctx.cfg,
        )
    if ctx.accelerator.is_main_process:
        ckpt.rotate_checkpoints(ctx.ckpt_root, ctx.cfg.checkpoint.max_ckpts, protect=path)
        log.info("checkpoint saved: %s", path)
        if ctx.pusher is not None and not pushes_merged_only(ctx.cfg):  # in the background, with the model card
            ctx.pusher.submit(path, f"medsft {ctx.cfg.experiment_name} step {state.global_step}",
                              card=_model_card(ctx, checkpoint=path.name))
    ctx.accelerator.wait_for_everyone()
    evaluate_checkpoint(ctx, path)
    return path


# ----------------------------------------------------------------------------------------------- train


def train(cfg: DictConfig, run_dir: Path) -> Optional[float]:
    """Run the SFT stage described by `cfg`; returns the objective (final val loss, else final train loss)."""
    run_dir = Path(run_dir)
    stats = RunStats()  # before setup: the wall time includes loading data and model
    ctx = setup(cfg, run_dir)
    ctx.stats = stats
    accelerator, state, plan = ctx.accelerator, ctx.state, ctx.plan
    is_main = accelerator.is_main_process
    preemption = PreemptionHandler().install()  # SIGTERM: checkpoint at the next step boundary, exit 75
    try:
        resumed = maybe_resume(ctx)  # updates ctx.state (= state) in place
        if resumed is not None and resumed.complete:
            return report_complete(ctx, resumed)
        if is_main:
            ctx.tracker.start(cfg, run_name=run_name(cfg), config=to_plain_dict(cfg), resume_id=state.wandb_run_id)
        _log_plan(ctx)
        ctx.metrics.write(data_record(ctx.data.stats))  # examples and tokens per source ("kind": "data")

        report = {"val_loss_before": _log_validation(ctx)} if ctx.data.val else {}  # a val point at this step
        before = _generation_check(ctx, "before")
        ctx.model.train()
        progress = _progress_bar(ctx)
        last_saved_step = state.global_step if state.global_step else -1
        window = MetricWindow.restored(resumed.window if resumed else None, is_main)
        restore_rng(resumed.rng if resumed else {})  # RNG as saved: what ran since load_state must not shift it
        while state.epoch < plan.epochs and state.global_step < plan.total_steps:
            groups = ctx.order.step_groups(plan, state.epoch, accelerator.process_index)
            for group in groups[state.step_in_epoch :]:
                started, tokens_before = time.perf_counter(), window.sums["tokens"]
                optimizer_step(ctx, group, window)
                stats.add_step(window.sums["tokens"] - tokens_before, time.perf_counter() - started)
                faults.after_step(state.global_step)  # TEST-ONLY
                progress.update(1)
                window.steps += 1
                epoch_float = state.epoch + state.step_in_epoch / len(groups)
                if state.global_step % cfg.logging.every_n_steps == 0 or state.global_step == plan.total_steps:
                    record = log_window(ctx, window, epoch_float)
                    progress.set_postfix_str(f"loss {record['loss']:.4f}, lr {record['lr']:.2e}, "
                                             f"{rate(record['tokens_per_s'])}")
                    window = MetricWindow()
                if cfg.train.eval_every_n_steps and state.global_step % cfg.train.eval_every_n_steps == 0:
                    _log_validation(ctx)
                if cfg.checkpoint.every_n_steps and state.global_step % cfg.checkpoint.every_n_steps == 0:
                    save(ctx, state.epoch, window)
                    last_saved_step = state.global_step
                if state.global_step < plan.total_steps and preemption.stop_requested(accelerator):
                    saved = last_saved_step == state.global_step
                    path = ckpt.latest_complete_checkpoint(ctx.ckpt_root) if saved else save(ctx, state.epoch, window)
                    raise preemption.preempted(state.global_step, path)
                if state.global_step >= plan.total_steps:
                    break
            else:
                finished_epoch = state.epoch
                state.epoch += 1
                state.step_in_epoch = 0
                if cfg.checkpoint.save_at_epoch_end and last_saved_step != state.global_step:
                    save(ctx, finished_epoch, window)
                    last_saved_step = state.global_step
                continue
            break
        progress.close()

        report["val_loss_after"] = _log_validation(ctx) if ctx.data.val else None
        if cfg.checkpoint.save_final and last_saved_step != state.global_step:
            save(ctx, max(0, min(state.epoch, plan.epochs - 1)))
        merge_final(ctx, ckpt.latest_complete_checkpoint(ctx.ckpt_root))  # checkpoint.merge_adapter=true
        after = _generation_check(ctx, "after")  # after the final save: under ZeRO-3 it reads that folder
        write_debug_dump(ctx)
        summary = _summarize(ctx, report, before, after)
        return summary["objective"]
    finally:
        preemption.uninstall()
        _cleanup(ctx)


def _log_validation(ctx: RunContext) -> Optional[float]:
    val_loss = validation_loss(ctx)
    if val_loss is not None:
        ctx.state.last_val_loss = val_loss
        record = {"kind": "val", "step": ctx.state.global_step, "val_loss": val_loss}
        ctx.metrics.write(record)
        ctx.tracker.log({"val_loss": val_loss}, step=ctx.state.global_step)
        log.info("step %d: val_loss %.4f", ctx.state.global_step, val_loss)
    return val_loss


def _generation_check(ctx: RunContext, when: str) -> Optional[dict]:
    if not ctx.cfg.generation_check.enabled or not ctx.data.val_records:
        return None
    return run_generation_check(ctx, when)


def _progress_bar(ctx: RunContext):
    enabled = ctx.accelerator.is_main_process and ctx.cfg.logging.progress_bar
    return tqdm(total=ctx.plan.total_steps, initial=ctx.state.global_step, disable=not enabled,
                desc=ctx.cfg.experiment_name, unit="step", dynamic_ncols=True)


def _log_plan(ctx: RunContext) -> None:
    plan, stats = ctx.plan, ctx.data.stats
    log.info(
        "data: %d train / %d val examples (%s); global batch %d = %d per device x %d accumulation x %d processes; "
        "%d optimizer steps (%d per epoch), warmup %d",
        len(ctx.data.train), len(ctx.data.val or []), _stats_line(stats), plan.global_batch, plan.bsz, plan.accum,
        plan.world, plan.total_steps, plan.steps_per_epoch, plan.warmup_steps(ctx.cfg.optimizer.warmup_rates),
    )


def _stats_line(stats: dict) -> str:
    keys = ("dropped_overlong", "truncated", "invalid_skipped", "duplicates")
    return ", ".join(f"{k} {stats[k]}" for k in keys if stats.get(k)) or "none dropped"


def run_name(cfg: DictConfig) -> str:
    try:
        overrides = HydraConfig.get().job.override_dirname
    except ValueError:  # not under Hydra (tests, medsft train from python)
        overrides = ""
    return redact(f"{cfg.experiment_name}-{overrides}" if overrides else cfg.experiment_name)  # never a secret


def _summarize(ctx: RunContext, report: dict, before: Optional[dict], after: Optional[dict]) -> dict:
    state = ctx.state
    objective = report.get("val_loss_after")
    if objective is None:
        objective = state.last_loss
    figures = {
        "steps": state.global_step,
        "samples_seen": state.samples_seen,
        "skipped_steps": state.skipped_steps,
        "final_train_loss": state.last_loss,
        **{k: v for k, v in report.items() if v is not None},
        "checkpoint_dir": str(ctx.ckpt_root),
        **ctx.stats.figures(ctx.accelerator),  # collective: every process takes part
    }
    if report.get("val_loss_before") and report.get("val_loss_after") is not None:
        figures["val_loss_drop"] = 1.0 - report["val_loss_after"] / report["val_loss_before"]
    for tag, result in (("before", before), ("after", after)):
        if result:
            figures[f"format_compliance_{tag}"] = result["format_compliance"]
            figures[f"answers_in_spanish_{tag}"] = result["n_spanish"] / result["n"] if result["n"] else 0.0
            figures[f"mean_answer_chars_{tag}"] = result["mean_chars"]
    summary = ctx.metrics.write_summary(figures, objective)
    ctx.tracker.summary(summary)
    if ctx.pusher is not None:
        ctx.pusher.update_card(_model_card(ctx, final=True), f"medsft {ctx.cfg.experiment_name}: final model card")
    if ctx.accelerator.is_main_process:
        if ctx.cfg.logging.plot:
            plot_curves(ctx.metrics.records, ctx.run_dir / "curves.png", title=ctx.cfg.experiment_name)
        _print_summary(ctx, summary)
    return summary


def _model_card(ctx: RunContext, checkpoint: Optional[str] = None, final: bool = False) -> str:
    run = {"train_examples": len(ctx.data.train), "val_examples": len(ctx.data.val or []),
           "total_steps": ctx.plan.total_steps, "step": ctx.state.global_step}
    return model_card(ctx.cfg, ctx.metrics.records, run, command_line(), checkpoint=checkpoint, final=final)


def _print_summary(ctx: RunContext, summary: dict) -> None:
    def fmt(value):
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    lines = ["", "== medsft run summary =="]
    lines += [f"  {key:<24} {fmt(value)}" for key, value in summary.items() if key != "kind" and key not in COST_KEYS]
    lines += [f"  {label:<24} {text}" for label, text in cost_lines(summary)]
    latest = ckpt.latest_complete_checkpoint(ctx.ckpt_root)
    lines += [
        f"  {'latest checkpoint':<24} {latest}",
        f"  {'run directory':<24} {ctx.run_dir.resolve()}  (metrics.jsonl, curves.png, .hydra/config.yaml)",
    ]
    if ctx.tracker.backend == "wandb":
        lines.append(f"  {'wandb':<24} {Path(ctx.cfg.log_dir).resolve() / ctx.cfg.experiment_name / 'wandb'}")
    print("\n".join(lines), flush=True)


def _cleanup(ctx: RunContext) -> None:
    """Ordered shutdown: waiting, freeing the engine, then ending the process group avoids the gloo abort
    at exit seen in ~15% of 2-process runs on this machine."""
    accelerator = ctx.accelerator
    if ctx.pusher is not None:
        ctx.pusher.close()
        for error in ctx.pusher.errors:
            log.warning(error)
    ctx.tracker.finish()
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    ctx.model = ctx.optimizer = ctx.scheduler = None
    gc.collect()
    accelerator.end_training()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
