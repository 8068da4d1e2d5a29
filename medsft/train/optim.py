"""Optimizer parameter groups and the LR schedule (over the step plan of medsft.data.order)."""

from __future__ import annotations

import math

import torch

from medsft.data.order import StepPlan

# Parameter-name fragments of normalisation layers across Llama/Qwen/Mistral/GPT-style models. HuatuoGPT's
# "LayerNorm.weight" filter misses Llama's `input_layernorm`, `post_attention_layernorm` and final `norm`.
_NORM_MARKERS = ("norm", "ln_", "ln1", "ln2", "layernorm")


def is_no_decay(name: str, param: torch.nn.Parameter) -> bool:
    """Biases, norm weights and any 1-D parameter never get weight decay; matrices do."""
    lowered = name.lower()
    # Under ZeRO-3 a loaded parameter is a flat, empty shard; its real shape is in ds_shape.
    ndim = len(getattr(param, "ds_shape", param.shape))
    if ndim < 2 or lowered.endswith(".bias"):
        return True
    module_and_leaf = lowered.rsplit(".", 2)[-2:]
    return any(marker in part for part in module_and_leaf for marker in _NORM_MARKERS)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if is_no_decay(name, param) else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, opt_cfg) -> torch.optim.Optimizer:
    groups = param_groups(model, opt_cfg.weight_decay)
    kwargs = dict(lr=opt_cfg.learning_rate, betas=tuple(opt_cfg.betas), eps=opt_cfg.eps)
    try:
        # The fused kernel: ~5x faster optimizer steps than the default on CPU (measured on a 30M Llama), and
        # the usual choice on CUDA. Falls back where the parameters' device/dtype has no fused kernel.
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(groups, **kwargs)


def lr_multiplier(step: int, total: int, warmup: int, kind: str, min_ratio: float = 0.0) -> float:
    """LR factor for optimizer step `step` (0-based): linear warmup, then cosine/linear decay to min_ratio."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    decay_steps = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    if kind == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        shape = 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, opt_cfg, plan: StepPlan) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepped exactly once per optimizer step by the loop (never prepared by accelerate, whose
    wrapper would step it once per process)."""
    total, warmup = plan.total_steps, plan.warmup_steps(opt_cfg.warmup_rates)
    kind, min_ratio = opt_cfg.scheduler, opt_cfg.min_lr_ratio
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, total, warmup, kind, min_ratio)
    )
