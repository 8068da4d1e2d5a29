"""The models of the RL stage: the policy (with the SFT template and stop tokens), its tokenizer, and PPO's
value model."""

from __future__ import annotations

from typing import Optional

import torch
from omegaconf import DictConfig
from peft import LoraConfig
from transformers import AutoModelForSequenceClassification

from medsft.data.render import end_of_turn_ids, ensure_chat_template
from medsft.errors import ConfigError, ModelSourceError
from medsft.models import is_adapter_dir, load_model, load_tokenizer, resolve_model_dir, torch_dtype
from medsft.models.adapters import attach_adapter, check_target_modules, lora_config, merge_adapter
from medsft.models.load import adapter_base_dir


def load_policy_tokenizer(cfg: DictConfig):
    """The tokenizer of model.path with the chat template SFT rendered with (medsft.data.render)."""
    tokenizer = load_tokenizer(cfg.model)
    ensure_chat_template(tokenizer)
    return tokenizer


def load_policy(cfg: DictConfig, tokenizer, system_prompt: Optional[str]):
    """The policy of model.path, stopping where SFT taught it to stop (the template's end-of-turn token + eos)."""
    # "auto": fp32 master weights, as SFT; an adapter checkpoint loads merged into its base; peft.load_in_4bit:
    # a 4-bit base (QLoRA)
    model = load_model(cfg.model, dtype=torch_dtype(cfg.model.dtype), peft_cfg=cfg.peft)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        raise ConfigError(
            f"model.path={cfg.model.path}: its tokenizer has no chat template, so medsft assigned one and added "
            "special tokens the model lacks; start RL from the SFT checkpoint, whose tokenizer carries the training "
            "template"
        )
    stops = model.generation_config.eos_token_id
    stops = [] if stops is None else ([stops] if isinstance(stops, int) else list(stops))
    for token in end_of_turn_ids(tokenizer, system_prompt) + [tokenizer.eos_token_id]:
        if token is not None and token not in stops:
            stops.append(token)
    model.generation_config.eos_token_id = stops
    return model


def policy_peft_config(cfg: DictConfig, model) -> Optional[LoraConfig]:
    """The LoRA config TRL wraps the policy with (`peft.enabled`), its target names checked against the model
    first; None for full fine-tuning. The reference policy is then the policy with the adapter disabled."""
    if not cfg.peft.enabled:
        return None
    check_target_modules(model, cfg.peft)
    return lora_config(cfg.peft)


def load_value_model(cfg: DictConfig, dtype: torch.dtype):
    """PPO's value model: AutoModelForSequenceClassification (num_labels=1), its backbone scored per token."""
    source = cfg.rl.ppo.value_model_path or cfg.model.path
    path = resolve_model_dir(str(source), cfg.model.cache_dir, cfg.model.tiny)
    adapter = path if is_adapter_dir(path) else None  # an adapter checkpoint: its base's backbone + the adapter
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            adapter_base_dir(cfg.model, adapter) if adapter else path, num_labels=1, dtype=dtype,
            trust_remote_code=bool(cfg.model.trust_remote_code)
        )
        return merge_adapter(attach_adapter(model, adapter)) if adapter else model
    except (OSError, ValueError, KeyError) as err:
        raise ModelSourceError(f"rl.ppo.value_model_path={source}: cannot load it ({err})") from err
