"""TEST-ONLY: a dump of each process's final state for the distributed tests (tests/test_distributed.py).

Inert unless $MEDSFT_DEBUG_DUMP names a folder: then, at the end of training, every process writes
rank<N>.json there (step counts, a hash of the full weights, the LR in the real optimizer, the optimizer's
parameter groups, peak RSS and GPU memory) and rank 0 the logits of a fixed input. It has no config key on
purpose, so a production config can never enable it. benchmarks/gpu_check.py and benchmarks/distributed.py
read it too.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import torch
from torch.distributed.tensor import DTensor

from medsft.runtime.accelerator import deepspeed_engine
from medsft.runtime.fsdp import fsdp_units, is_fsdp

DEBUG_DUMP_ENV = "MEDSFT_DEBUG_DUMP"
DEBUG_PROMPT = "## Thinking\n\nDolor torácico opresivo irradiado al brazo izquierdo"


def _zero3_gather(module, engine):
    if engine is not None and engine.zero_optimization_stage() == 3:
        import deepspeed  # the optional extra, present whenever a DeepSpeed engine exists

        engine.empty_partition_cache()  # parameters prefetched by the last forward are "in flight": settle them
        return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
    return nullcontext()


def _full(param: torch.Tensor) -> torch.Tensor:
    """The whole tensor: an FSDP2 shard (DTensor) is gathered, a collective every process runs in name order."""
    return param.full_tensor() if isinstance(param, DTensor) else param


def weights_digest(module) -> tuple[str, int]:
    """sha256 of the full parameters (names, shapes, fp32 bytes) and their element count."""
    digest = hashlib.sha256()
    count = 0
    for name, param in sorted(module.named_parameters(), key=lambda item: item[0]):
        data = _full(param.detach()).to("cpu", torch.float32).contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(data.shape)).encode())
        digest.update(data.numpy().tobytes())
        count += data.numel()
    return digest.hexdigest(), count


def _optimizer_steps(ctx, engine) -> Optional[int]:
    if engine is not None:
        return int(engine.global_steps - engine.skipped_steps)
    optimizer = getattr(ctx.optimizer, "optimizer", ctx.optimizer)
    for state in optimizer.state.values():
        if "step" in state:
            return int(state["step"])
    return 0


def _param_groups(optimizer) -> list[dict]:
    """Per optimizer parameter group: its weight decay and the (full) number of dimensions of its tensors."""
    return [{"weight_decay": float(group.get("weight_decay", 0.0)),
             "ndims": sorted({p.ndim for p in group["params"]}),
             "tensors": len(group["params"]),
             "dtensors": sum(isinstance(p, DTensor) for p in group["params"])}
            for group in optimizer.param_groups]


def write_debug_dump(ctx) -> None:
    """Collective (every process calls it): rank<N>.json per process, reference logits on rank 0.

    No-op unless $MEDSFT_DEBUG_DUMP names a folder. Called by the loop after the final checkpoint, so the
    logits are those of the saved weights.
    """
    out = os.environ.get(DEBUG_DUMP_ENV)
    if not out:
        return
    out = Path(out)
    # Peaks of the training itself, before the gathers below add their own.
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: ru_maxrss is in kilobytes
    peak_gpu_gib = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    accelerator, model = ctx.accelerator, ctx.model
    engine = deepspeed_engine(accelerator)
    module = accelerator.unwrap_model(model)
    with _zero3_gather(module, engine):
        digest, count = weights_digest(module)
    ids = ctx.tokenizer(DEBUG_PROMPT, return_tensors="pt").input_ids
    was_training = model.training
    model.eval()
    with torch.no_grad(), accelerator.autocast():
        logits = model(input_ids=ids.to(accelerator.device)).logits.float().cpu()
    if was_training:
        model.train()
    optimizer = engine.optimizer if engine is not None else getattr(ctx.optimizer, "optimizer", ctx.optimizer)
    record = {
        "rank": accelerator.process_index,
        "world": accelerator.num_processes,
        "global_step": ctx.state.global_step,
        "skipped_steps": ctx.state.skipped_steps,
        "optimizer_steps": _optimizer_steps(ctx, engine),
        "lr_in_optimizer": float(optimizer.param_groups[0]["lr"]),
        "weights_sha256": digest,
        "num_parameters": count,
        "loss_scale": ctx.loss_scale,
        "param_groups": _param_groups(optimizer),
        "fsdp": {"units": fsdp_units(module), "distributed_type": str(accelerator.distributed_type)}
        if is_fsdp(accelerator) else None,
        "peak_rss_mib": peak_rss_mib,
        "peak_gpu_mem_gib": peak_gpu_gib,
        "deepspeed": None if engine is None else {
            "zero_stage": engine.zero_optimization_stage(),
            "gradient_accumulation_steps": engine.gradient_accumulation_steps(),
            "train_micro_batch_size_per_gpu": engine.train_micro_batch_size_per_gpu(),
            "train_batch_size": engine.train_batch_size(),
            "dp_world_size": engine.dp_world_size,
            "global_steps": engine.global_steps,
            "skipped_steps": engine.skipped_steps,
            "optimizer": type(engine.optimizer).__name__,
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{accelerator.process_index}.json").write_text(json.dumps(record, indent=2), encoding="utf-8")
    if accelerator.is_main_process:
        torch.save({"input_ids": ids, "logits": logits}, out / "reference_logits.pt")
    accelerator.wait_for_everyone()
