"""DeepSpeed: the JSON generated from the medsft config (one source of truth, no value written twice), the
accelerate plugin built from it, and the two DeepSpeed-specific rules of the training step.

Where each DeepSpeed value comes from:

    train_micro_batch_size_per_gpu   train.train_bsz_per_gpu
    gradient_accumulation_steps      train.gradient_accumulation_steps
    train_batch_size                 micro x accumulation x world ("auto" until the world is known: accelerate
                                     fills it from the real process count, so DeepSpeed's batch assert holds)
    gradient_clipping                optimizer.max_grad_norm (0 = off)
    bf16 / fp16                      train.mixed_precision, resolved (auto = bf16 on a bf16 GPU, else fp32)
    zero_optimization.*              the `deepspeed` group (conf/deepspeed/*.yaml): stage, offload, buckets,
                                     stage3_gather_16bit_weights_on_model_save

The optimizer and the LR schedule are NOT in the JSON: medsft builds its own AdamW (param groups without
decay for norms and biases) and steps its own LambdaLR once per optimizer step; DeepSpeed wraps that
optimizer (ZeRO keeps its param_group dicts, so the schedule reaches the real LR). With CPU offload,
accelerate swaps AdamW for DeepSpeedCPUAdam on the same param_group dicts.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Optional

import torch
from accelerate.utils import DeepSpeedPlugin
from omegaconf import DictConfig

from medsft.errors import ConfigError, TrainingDiverged

log = logging.getLogger("medsft.distributed")

# DeepSpeed prints a progress line every N steps; medsft logs its own metrics.
_STEPS_PER_PRINT = 10**9


def _bf16_supports(option: str) -> bool:
    """Whether the installed DeepSpeed's bf16 section knows `option` (its config models forbid extra keys)."""
    try:  # the optional extra `deepspeed`
        from deepspeed.runtime.precision_config import DeepSpeedBF16Config
    except Exception:  # noqa: BLE001 - deepspeed missing or reorganised: write only what every version knows
        return False
    return option in getattr(DeepSpeedBF16Config, "model_fields", {})


def zero_section(ds: DictConfig) -> dict:
    """`zero_optimization` from the deepspeed group."""
    stage = int(ds.zero_stage)
    if ds.offload_params and stage != 3:
        raise ConfigError(f"deepspeed.offload_params=true needs deepspeed.zero_stage=3 (got {stage}): "
                          "only ZeRO-3 partitions parameters; use deepspeed=zero3_offload")
    zero: dict[str, Any] = {
        "stage": stage,
        "overlap_comm": bool(ds.overlap_comm),
        "contiguous_gradients": bool(ds.contiguous_gradients),
        # "auto": accelerate sets hidden_size**2 from the model when it prepares it.
        "reduce_bucket_size": ds.reduce_bucket_size,
    }
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if stage == 3:
        zero.update({
            "stage3_prefetch_bucket_size": "auto",
            "stage3_param_persistence_threshold": "auto",
            # Checkpoints hold the full, gathered 16-bit weights (from_pretrained works on them directly).
            "stage3_gather_16bit_weights_on_model_save": bool(ds.stage3_gather_16bit_weights_on_model_save),
        })
        if ds.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return zero


def deepspeed_json(cfg: DictConfig, mixed_precision: str, world_size: Optional[int] = None) -> dict:
    """The DeepSpeed config dict for `cfg`; `mixed_precision` is the resolved one (no | bf16 | fp16)."""
    if mixed_precision not in ("no", "bf16", "fp16"):
        raise ConfigError(f"mixed precision {mixed_precision!r} cannot be expressed in a DeepSpeed config "
                          "(use train.mixed_precision=no|bf16|fp16)")
    micro = int(cfg.train.train_bsz_per_gpu)
    accum = int(cfg.train.gradient_accumulation_steps)
    max_grad_norm = float(cfg.optimizer.max_grad_norm or 0.0)
    bf16: dict[str, Any] = {"enabled": mixed_precision == "bf16"}
    if mixed_precision == "bf16" and _bf16_supports("check_grad_overflow"):
        # A non-finite gradient skips the step (medsft's NaN-skip relies on it under DeepSpeed).
        bf16["check_grad_overflow"] = True
    fp16: dict[str, Any] = {"enabled": mixed_precision == "fp16"}
    if mixed_precision == "fp16":
        fp16.update({"loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2,
                     "min_loss_scale": 1})
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * int(world_size) if world_size else "auto",
        "gradient_clipping": max_grad_norm if max_grad_norm > 0 else 0.0,
        "bf16": bf16,
        "fp16": fp16,
        "zero_optimization": zero_section(cfg.deepspeed),
        "zero_allow_untested_optimizer": True,
        "steps_per_print": _STEPS_PER_PRINT,
        "wall_clock_breakdown": False,
    }


def build_deepspeed_plugin(cfg: DictConfig, mixed_precision: str):
    """The accelerate DeepSpeedPlugin for this process, from `deepspeed_json` (nothing read from env files)."""
    try:  # the optional extra `deepspeed`
        import deepspeed  # noqa: F401
    except ImportError as err:
        raise ConfigError(f"deepspeed={cfg.deepspeed.name} needs DeepSpeed: "
                          "DS_BUILD_OPS=0 pip install -e '.[deepspeed]'") from err
    config = copy.deepcopy(deepspeed_json(cfg, mixed_precision))
    stage = config["zero_optimization"]["stage"]
    return DeepSpeedPlugin(
        hf_ds_config=config,
        # ZeRO-3: from_pretrained partitions the weights while loading (no full copy per process).
        zero3_init_flag=stage == 3,
        zero3_save_16bit_model=bool(config["zero_optimization"].get("stage3_gather_16bit_weights_on_model_save",
                                                                     False)),
    )


def nonfinite_backward_loss(loss: torch.Tensor) -> torch.Tensor:
    """The loss to back-propagate under DeepSpeed when the step must be skipped.

    DeepSpeed must see every backward of a step (its accumulation boundary runs the optimizer), so the loop
    cannot just stop calling backward as it does without DeepSpeed. NaN gradients make DeepSpeed's ZeRO step
    detect an overflow, skip the update on every process and clear the accumulated gradients (fp32 and ZeRO-3
    always; bf16 with bf16.check_grad_overflow, which the generated config sets).
    """
    return loss * float("nan")


def deepspeed_step_applied(model, finite: bool) -> bool:
    """Whether the step DeepSpeed just ran (inside the last backward) updated the weights.

    False when medsft flagged a non-finite loss, and also when the loss was finite but DeepSpeed found non-finite
    gradients and skipped the update (fp32/bf16 overflow, fp16 loss-scale overflow): the loop then counts a skipped
    step, as without DeepSpeed. Raises if DeepSpeed applied a step medsft flagged as non-finite.
    """
    was_applied = getattr(model, "was_step_applied", None)
    applied = bool(was_applied()) if callable(was_applied) else finite
    if applied and not finite:
        raise TrainingDiverged("DeepSpeed applied an optimizer step whose gradients were not finite (this DeepSpeed "
                               "version does not skip non-finite bf16 steps: it lacks bf16.check_grad_overflow); "
                               "upgrade DeepSpeed or train in fp32")
    return finite and applied
