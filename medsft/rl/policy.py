"""The models of the RL stage: the policy (with the SFT template and stop tokens), its tokenizer, and PPO's
value model."""

from __future__ import annotations

from typing import Optional

import torch
from omegaconf import DictConfig
from transformers import AutoModelForSequenceClassification

from medsft.data.render import end_of_turn_ids, ensure_chat_template
from medsft.errors import ConfigError, ModelSourceError
from medsft.models import load_model, load_tokenizer, resolve_model_dir, torch_dtype


def load_policy_tokenizer(cfg: DictConfig):
    """The tokenizer of model.path with the chat template SFT rendered with (medsft.data.render)."""
    tokenizer = load_tokenizer(cfg.model)
    ensure_chat_template(tokenizer)
    return tokenizer


def load_policy(cfg: DictConfig, tokenizer, system_prompt: Optional[str]):
    """The policy of model.path, stopping where SFT taught it to stop (the template's end-of-turn token + eos)."""
    model = load_model(cfg.model, dtype=torch_dtype(cfg.model.dtype))  # "auto": fp32 master weights, as SFT
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


def load_value_model(cfg: DictConfig, dtype: torch.dtype):
    """PPO's value model: AutoModelForSequenceClassification (num_labels=1), its backbone scored per token."""
    source = cfg.rl.ppo.value_model_path or cfg.model.path
    path = resolve_model_dir(str(source), cfg.model.cache_dir, cfg.model.tiny)
    try:
        return AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, dtype=dtype, trust_remote_code=bool(cfg.model.trust_remote_code)
        )
    except OSError as err:
        raise ModelSourceError(f"rl.ppo.value_model_path={source}: cannot load it ({err})") from err
