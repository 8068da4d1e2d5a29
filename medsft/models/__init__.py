"""Models: resolve `model.path`, check a local folder (files.py) and load model + tokenizer (load.py), the two
sources that need no Hub (the embedded SmolLM2, embedded.py; the tiny random test model, tiny.py), the local
cache (cache.py), pad tokens (pad_token.py), parameter-efficient adapters through peft (adapters.py) and merging
one into its base (merge.py)."""

from medsft.models.adapters import apply_peft, is_adapter_dir
from medsft.models.embedded import EMBEDDED_SMOLLM2, WheelDownloadError, prepare_embedded_smollm2
from medsft.models.load import (
    ALLOWED_SOURCES,
    check_model_source,
    fit_embeddings,
    load_model,
    load_model_and_tokenizer,
    load_tokenizer,
    require_4bit_support,
    resolve_model_dir,
    snapshot_hub_model,
    torch_dtype,
    training_dtype,
)
from medsft.models.tiny import TINY_RANDOM, TINY_RANDOM_QWEN2, build_tiny_random

__all__ = [
    "ALLOWED_SOURCES", "EMBEDDED_SMOLLM2", "TINY_RANDOM", "TINY_RANDOM_QWEN2", "WheelDownloadError", "apply_peft",
    "build_tiny_random", "check_model_source", "fit_embeddings", "is_adapter_dir", "load_model",
    "load_model_and_tokenizer", "load_tokenizer", "prepare_embedded_smollm2", "require_4bit_support",
    "resolve_model_dir", "snapshot_hub_model", "torch_dtype", "training_dtype",
]
