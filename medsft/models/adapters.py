"""Parameter-efficient fine-tuning through `peft`: LoRA, DoRA, rsLoRA and QLoRA's k-bit preparation.

* `apply_peft(model, peft_cfg, gradient_checkpointing)`: the `peft` group -> a `PeftModel` whose only trainable
  parameters are the adapter's (and `peft.modules_to_save`); target names are checked against the model first,
  so a typo fails naming the missing names and the model's linear layers. The log states trainable and total
  parameter counts.
* Adapter folders (`adapter_config.json` + `adapter_model.safetensors`, peft's format): `is_adapter_dir`,
  `adapter_base_reference` (the base model the adapter was trained on), `attach_adapter` (base + adapter ->
  PeftModel) and `merge_adapter` (W + scale * B @ A written into the base: a plain model).

Loading an adapter checkpoint where `model.path` is accepted is medsft.models.load's (it resolves the base).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from peft.tuners.lora import LoraLayer
from transformers import PreTrainedModel
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.pytorch_utils import Conv1D

from medsft.errors import ConfigError, ModelSourceError

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ALL_LINEAR = "all-linear"
# Layer types peft's LoRA adapts (bitsandbytes' Linear4bit is an nn.Linear).
_ADAPTABLE = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, Conv1D)


# ----------------------------------------------------------------------------------------------- adapter folders


def is_adapter_dir(path: Any) -> bool:
    """A folder holding a peft adapter (adapter_config.json), e.g. a medsft LoRA checkpoint."""
    return path is not None and (Path(str(path)).expanduser() / ADAPTER_CONFIG).is_file()


def adapter_config(adapter_dir: str | Path) -> dict:
    path = Path(adapter_dir).expanduser() / ADAPTER_CONFIG
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelSourceError(f"{path}: not a readable adapter config ({err})") from err


def adapter_base_reference(adapter_dir: str | Path) -> str:
    """The base model an adapter was trained on (`base_model_name_or_path`: a local folder or a Hub id)."""
    reference = adapter_config(adapter_dir).get("base_model_name_or_path")
    if not reference:
        raise ModelSourceError(f"{Path(adapter_dir) / ADAPTER_CONFIG}: base_model_name_or_path is not set, so the "
                               "base model this adapter belongs to is unknown")
    return str(reference)


def is_peft_model(model: Any) -> bool:
    return isinstance(model, PeftModel)


def attach_adapter(base: PreTrainedModel, adapter_dir: str | Path, trainable: bool = False) -> PeftModel:
    """base + the adapter of `adapter_dir` (peft's `PeftModel.from_pretrained`)."""
    return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=trainable)


def merge_adapter(model: PeftModel) -> PreTrainedModel:
    """The adapter merged into the base weights (peft's `merge_and_unload`): a plain transformers model."""
    merged = model.merge_and_unload()
    merged.config.use_cache = True
    merged.requires_grad_(True)  # peft froze the base; a loaded model trains in full unless an adapter says not
    return merged


# ----------------------------------------------------------------------------------------------- target checks


def _leaf_name(qualified: str) -> str:
    return qualified.rsplit(".", 1)[-1]


def _matches(qualified: str, name: str) -> bool:
    """peft's rule for a list of target names: the module's full name is the name or ends with `.name`."""
    return qualified == name or qualified.endswith("." + name)


def linear_layer_names(model: torch.nn.Module) -> list[str]:
    """Leaf names of the model's linear layers (what `peft.target_modules` may name), the LM head last."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = sorted({_leaf_name(n) for n, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear) and m is not head})
    head_names = sorted({_leaf_name(n) for n, m in model.named_modules() if m is head and n})
    return names + [f"{name} (the LM head)" for name in head_names]


def check_target_modules(model: torch.nn.Module, peft_cfg: Any) -> None:
    """ConfigError naming every `peft.target_modules` / `peft.modules_to_save` entry the model lacks (or that
    names a layer LoRA cannot adapt), with the model's linear layers, before peft touches the model."""
    named = [(n, m) for n, m in model.named_modules() if n]
    problems = []
    targets = peft_cfg.target_modules
    if targets != ALL_LINEAR:
        missing = [t for t in targets if not any(_matches(n, t) for n, _ in named)]
        if missing:
            problems.append(f"peft.target_modules: {missing} not found in {type(model).__name__}")
        wrong = sorted({f"{t} ({type(m).__name__})" for t in targets for n, m in named
                        if _matches(n, t) and not isinstance(m, _ADAPTABLE)})
        if wrong:
            problems.append(f"peft.target_modules: {wrong} are not layers LoRA adapts (linear, embedding, conv)")
    keep = list(peft_cfg.modules_to_save or [])
    missing_keep = [t for t in keep if not any(_matches(n, t) for n, _ in named)]
    if missing_keep:
        problems.append(f"peft.modules_to_save: {missing_keep} not found in {type(model).__name__}")
    if problems:
        with_params = sorted({_leaf_name(n) for n, m in named if any(True for _ in m.parameters(recurse=False))})
        raise ConfigError(
            "; ".join(problems) + f". Its linear layers: {', '.join(linear_layer_names(model))}"
            + (f"; modules with weights: {', '.join(with_params)}" if missing_keep else "")
            + f" (or peft.target_modules={ALL_LINEAR})"
        )


# ----------------------------------------------------------------------------------------------- applying


def lora_config(peft_cfg: Any) -> LoraConfig:
    targets = peft_cfg.target_modules
    return LoraConfig(
        r=int(peft_cfg.r),
        lora_alpha=float(peft_cfg.alpha),
        lora_dropout=float(peft_cfg.dropout),
        target_modules=ALL_LINEAR if targets == ALL_LINEAR else [str(t) for t in targets],
        modules_to_save=[str(m) for m in peft_cfg.modules_to_save] or None,
        use_rslora=bool(peft_cfg.use_rslora),
        use_dora=bool(peft_cfg.use_dora),
        bias=str(peft_cfg.bias),
        task_type="CAUSAL_LM",
    )


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; ZeRO-3 partitions and bitsandbytes' packed 4-bit weights counted whole."""
    if is_peft_model(model):
        return model.get_nb_trainable_parameters()
    trainable = total = 0
    for param in model.parameters():
        count = getattr(param, "ds_numel", param.numel())
        total += count
        trainable += count if param.requires_grad else 0
    return trainable, total


def describe(model: torch.nn.Module, method: str) -> str:
    trainable, total = parameter_counts(model)
    share = 100.0 * trainable / total if total else 0.0
    return f"{method}: trainable parameters {trainable:,} of {total:,} ({share:.4f}%)"


def _method(peft_cfg: Any) -> str:
    extras = [label for flag, label in ((peft_cfg.use_dora, "DoRA"), (peft_cfg.use_rslora, "rsLoRA")) if flag]
    return " + ".join(["QLoRA (4-bit base)" if peft_cfg.load_in_4bit else "LoRA", *extras])


def apply_peft(model: PreTrainedModel, peft_cfg: Any, gradient_checkpointing: bool) -> torch.nn.Module:
    """The model itself when `peft.enabled` is false; else a PeftModel in which only the adapter (and
    `peft.modules_to_save`) trains. Call after gradient checkpointing is enabled, before accelerate.prepare."""
    if not peft_cfg.enabled:
        trainable, total = parameter_counts(model)
        log.info("full fine-tuning: trainable parameters %s of %s (100%%)", f"{trainable:,}", f"{total:,}")
        return model
    check_target_modules(model, peft_cfg)
    if getattr(model, "is_loaded_in_4bit", False):
        # QLoRA: freeze the base, upcast its non-quantised weights to fp32, checkpointing as configured.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    if gradient_checkpointing:
        # With a frozen embedding no checkpointed input would require grad; make the embedding output require it
        # so every checkpointed segment has a gradient path (also right under reentrant checkpointing).
        model.enable_input_require_grads()
    # Under ZeRO-3 every parameter must share one dtype (DeepSpeed #8072): keep the adapter in the base's dtype
    # there rather than peft's fp32 upcast (which only a 4-bit base needs).
    upcast = not is_deepspeed_zero3_enabled() or getattr(model, "is_loaded_in_4bit", False)
    peft_model = get_peft_model(model, lora_config(peft_cfg), autocast_adapter_dtype=upcast)
    if upcast:
        # peft upcasts the adapter; `modules_to_save` are copies of (possibly bf16) base modules. AdamW needs fp32
        # master weights for everything it steps.
        for param in peft_model.parameters():
            if param.requires_grad and param.dtype in (torch.bfloat16, torch.float16):
                param.data = param.data.float()
    adapted = sum(1 for module in peft_model.modules() if isinstance(module, LoraLayer))
    targets = ALL_LINEAR if peft_cfg.target_modules == ALL_LINEAR else ",".join(peft_cfg.target_modules)
    log.info("%s", describe(peft_model, f"{_method(peft_cfg)} r={peft_cfg.r} alpha={peft_cfg.alpha:g} on {adapted} "
                                        f"layers ({targets})"))
    return peft_model


def trainable_names(model: torch.nn.Module) -> set[str]:
    return {name for name, param in model.named_parameters() if param.requires_grad}

