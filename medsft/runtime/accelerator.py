"""The Accelerator of this process, and how the loss must be scaled for it.

How a run becomes N processes is medsft.runtime.relaunch; this module is what each of those processes builds:
its device (CPU or CUDA), mixed precision, process group (gloo on CPU) and the DeepSpeed or FSDP2 plugin.
"""

from __future__ import annotations

import logging
import os
from contextlib import nullcontext
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from omegaconf import DictConfig

from medsft.errors import ConfigError
from medsft.runtime.deepspeed import build_deepspeed_plugin
from medsft.hardware import cpu_bf16_flags
from medsft.runtime.fsdp import (adopt_fsdp_on_cpu, build_fsdp_plugin, is_fsdp, launched_with_fsdp_env, prepare_fsdp,
                                 retie)

log = logging.getLogger("medsft.distributed")


def use_cpu(cfg: DictConfig) -> bool:
    return bool(cfg.launcher.cpu) or not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU") in ("1", "true")


def resolve_mixed_precision(cfg: DictConfig, cpu: bool) -> str:
    """train.mixed_precision with `auto` resolved: bf16 on a GPU that supports it and on a CPU with native bf16
    matrix units (medsft.hardware), else no (fp32). Master weights and optimizer state stay fp32."""
    wanted = cfg.train.mixed_precision
    if wanted != "auto":
        return wanted
    if cpu:
        return "bf16" if cpu_bf16_flags() else "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "no"


def describe_mixed_precision(cfg: DictConfig, cpu: bool) -> str:
    """The log line's account of the resolved precision, naming what `auto` detected."""
    resolved = resolve_mixed_precision(cfg, cpu)
    label = "bf16 autocast" if resolved == "bf16" else ("fp16 autocast" if resolved == "fp16" else "fp32")
    if cfg.train.mixed_precision != "auto":
        return f"{label} (train.mixed_precision={cfg.train.mixed_precision})"
    if cpu:
        found = cpu_bf16_flags()
        why = f"this CPU has {', '.join(found)}" if found else "this CPU has no native bf16 units (amx_bf16, avx512_bf16)"
    else:
        why = "this GPU supports bf16" if resolved == "bf16" else "this GPU has no bf16"
    return f"{label} (train.mixed_precision=auto: {why})"


def _launched_with_deepspeed_env() -> bool:
    """`accelerate launch` with a DeepSpeed accelerate config (not a plugin this process made itself)."""
    return bool(os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE"))


def build_accelerator(cfg: DictConfig):
    cpu = use_cpu(cfg)
    mixed_precision = resolve_mixed_precision(cfg, cpu)
    handlers = []
    if cpu and (int(os.environ.get("WORLD_SIZE", "1")) > 1 or cfg.deepspeed.enabled or cfg.fsdp.enabled):
        # gloo on CPU; without it accelerate under DeepSpeed believes world=1 and its batch assert fails (and
        # DeepSpeed's CPU default, oneCCL, is not installed).
        handlers.append(InitProcessGroupKwargs(backend="gloo", timeout=timedelta(minutes=30)))
    deepspeed_plugin = None
    if cfg.deepspeed.enabled:
        deepspeed_plugin = build_deepspeed_plugin(cfg, mixed_precision)
    elif _launched_with_deepspeed_env():
        # accelerate would build DeepSpeed from its own config file, behind the medsft config's back.
        raise ConfigError("this process was started by `accelerate launch` with a DeepSpeed config, but the medsft "
                          "config has deepspeed=none: pass the matching preset (e.g. deepspeed=zero3); medsft "
                          "builds the DeepSpeed config itself (`medsft launch-config` writes the accelerate files "
                          "from it)")
    fsdp_plugin = build_fsdp_plugin(cfg, mixed_precision, cpu) if cfg.fsdp.enabled else None
    if fsdp_plugin is None and launched_with_fsdp_env():
        raise ConfigError("this process was started by `accelerate launch` with an FSDP config, but the medsft "
                          "config has fsdp=none: pass the matching preset (e.g. fsdp=full_shard); medsft builds "
                          "the FSDP plugin itself (`medsft launch-config` writes the accelerate files from it)")
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        mixed_precision=mixed_precision,
        cpu=cpu and deepspeed_plugin is None,
        deepspeed_plugin=deepspeed_plugin,
        fsdp_plugin=fsdp_plugin,
        kwargs_handlers=handlers,
        step_scheduler_with_optimizer=False,
    )
    if fsdp_plugin is not None and cpu:
        adopt_fsdp_on_cpu(accelerator, fsdp_plugin)  # accelerate turns FSDP on for accelerator devices only
    if accelerator.num_processes > 1 and not accelerator.is_main_process:
        # Rank 0 tells the story; the others speak up only for warnings (every line twice helps nobody).
        logging.getLogger("medsft").setLevel(logging.WARNING)
    return accelerator


def prepare_model_and_optimizer(accelerator, cfg: DictConfig, model, optimizer):
    """accelerate.prepare; under FSDP2 after checking which layers become units (medsft.runtime.fsdp)."""
    if is_fsdp(accelerator):
        return prepare_fsdp(accelerator, cfg, model, optimizer)
    return accelerator.prepare(model, optimizer)


def full_state_dict(accelerator, model) -> dict:
    """The full weights for a Hugging Face export (a collective: every process calls it). ZeRO-3 and FSDP2 gather
    them from all processes (FSDP2: onto the main process's CPU; the others get an empty dict)."""
    state_dict = accelerator.get_state_dict(model)
    return retie(state_dict, accelerator.unwrap_model(model)) if is_fsdp(accelerator) else state_dict


def micro_batch_sync(accelerator, model, is_last: bool):
    """The context of one micro-batch's backward: DDP synchronises only the step's last micro-batch (no_sync
    before it); FSDP2 reduce-scatters every one, so the accumulated gradients stay sharded."""
    if is_last or is_fsdp(accelerator):
        return nullcontext()
    return accelerator.no_sync(model)


def deepspeed_engine(accelerator):
    """The DeepSpeed engine of this run, or None when DeepSpeed is off."""
    wrapped = getattr(accelerator, "deepspeed_engine_wrapped", None)
    return getattr(wrapped, "engine", None)


def loss_scale_for(accelerator) -> float:
    """Factor that turns 'sum of token losses / tokens of the whole step' into the right gradient.

    DDP averages gradients over processes and accelerate (non-DeepSpeed) divides each backward by the
    accumulation steps; FSDP2's reduce-scatter averages over processes too (at every micro-batch: the sum of
    those averages is the average of the sum), after the same division by the accumulation steps. DeepSpeed
    does the same two divisions itself: `engine.backward` divides the loss by its gradient_accumulation_steps,
    and the ZeRO reduction averages over the data-parallel group (sum, then divided by dp_world_size:
    postscale_gradients, the default). x world x accum undoes both, in every case;
    tests/test_distributed.py and tests/test_fsdp.py check first-step loss and grad norm of DeepSpeed and FSDP2
    against plain DDP / 1 process.
    """
    engine = deepspeed_engine(accelerator)
    if engine is not None:
        if not engine.postscale_gradients() or float(engine.gradient_predivide_factor()) != 1.0:
            log.warning("DeepSpeed prescale_gradients / gradient_predivide_factor changes gradient scaling; medsft "
                        "assumes the defaults (average over the data-parallel group)")
        return float(engine.dp_world_size * engine.gradient_accumulation_steps())
    return float(accelerator.num_processes * accelerator.gradient_accumulation_steps)
