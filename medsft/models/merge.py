"""An adapter merged into its base model, written as a plain Hugging Face model folder (`medsft merge`,
`checkpoint.merge_adapter=true`).

The folder holds config.json + model.safetensors (W + scale * B @ A in every adapted layer, `modules_to_save`
taken from the adapter), generation_config.json, the adapter checkpoint's tokenizer (chat template included) and
a model card naming the base model. It is written next to its destination first and renamed into place, so a
killed merge never leaves a half-written model under the final name. Its logits equal base+adapter's up to
float rounding (tests/test_peft.py: max abs difference <= 1e-5 in float32).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from medsft.errors import ConfigError, ModelSourceError
from medsft.models.adapters import adapter_base_reference, is_adapter_dir
from medsft.models.load import load_model, load_tokenizer

log = logging.getLogger(__name__)

MERGED_DIR = "merged"
_CARD = """---
base_model: {base}
library_name: transformers
tags:
- medsft
- lora
- merged
---

# {name}

The LoRA adapter of `{adapter}` merged into its base model `{base}` by medsft (`medsft merge`): a plain
transformers model, `AutoModelForCausalLM.from_pretrained` loads it without peft.
"""


def merge_to_folder(model_cfg: Any, out_dir: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Merge the adapter at `model_cfg.path` into its base; write the plain model to `out_dir`. Returns out_dir.

    `dtype`: the merged weights' dtype; None = the base model's stored dtype (`from_pretrained(dtype="auto")`).
    Refuses an `out_dir` that exists and is not empty.
    """
    adapter_dir = Path(str(model_cfg.path)).expanduser()
    if not is_adapter_dir(adapter_dir):
        raise ModelSourceError(f"{adapter_dir}: no adapter_config.json here, so there is no adapter to merge "
                               "(a full fine-tune's checkpoint is already a plain model)")
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out}: exists and is not an empty folder; choose a new folder")
    tmp = out.parent / f".tmp-{out.name}"
    if tmp.exists():  # left by a killed merge
        shutil.rmtree(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    merged = load_model(model_cfg, dtype="auto" if dtype is None else dtype)
    merged.save_pretrained(tmp, safe_serialization=True)
    load_tokenizer(model_cfg).save_pretrained(tmp)  # the checkpoint's (chat template included), else the base's
    base = adapter_base_reference(adapter_dir)
    (tmp / "README.md").write_text(_CARD.format(base=base, name=out.name, adapter=adapter_dir), encoding="utf-8")
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    log.info("merged %s into %s: %s", adapter_dir, base, out)
    return out
