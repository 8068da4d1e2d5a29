"""From config to processes: the Accelerator for this process, and how the loss must be scaled for it."""

from __future__ import annotations

import logging
import os
from datetime import timedelta

import torch
from omegaconf import DictConfig

log = logging.getLogger("medsft.distributed")


def use_cpu(cfg: DictConfig) -> bool:
    return bool(cfg.launcher.cpu) or not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU") in ("1", "true")


def resolve_mixed_precision(cfg: DictConfig, cpu: bool) -> str:
    wanted = cfg.train.mixed_precision
    if wanted != "auto":
        return wanted
    if not cpu and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def build_accelerator(cfg: DictConfig):
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    cpu = use_cpu(cfg)
    mixed_precision = resolve_mixed_precision(cfg, cpu)
    handlers = []
    if cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # gloo on CPU; without it accelerate under DeepSpeed believes world=1 and its batch assert fails.
        handlers.append(InitProcessGroupKwargs(backend="gloo", timeout=timedelta(minutes=30)))
    deepspeed_plugin = None
    if cfg.deepspeed.enabled:
        from medsft.deepspeed_config import build_deepspeed_plugin

        deepspeed_plugin = build_deepspeed_plugin(cfg, mixed_precision)
    return Accelerator(
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        mixed_precision=mixed_precision,
        cpu=cpu and deepspeed_plugin is None,
        deepspeed_plugin=deepspeed_plugin,
        kwargs_handlers=handlers,
        step_scheduler_with_optimizer=False,
    )


def loss_scale_for(accelerator) -> float:
    """Factor that turns 'sum of token losses / tokens of the whole step' into the right gradient.

    DDP and DeepSpeed average gradients over processes (x world undoes it); accelerate (non-DeepSpeed) and
    DeepSpeed's engine divide each backward by the accumulation steps (x accum undoes it).
    """
    return float(accelerator.num_processes * accelerator.gradient_accumulation_steps)

