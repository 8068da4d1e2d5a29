"""`medsft merge <adapter checkpoint> --out DIR [--dtype auto|float32|bfloat16|float16]`: merge a LoRA/DoRA/QLoRA
adapter into its base model and write a plain Hugging Face model folder (loads without peft).

    medsft merge ckpts/demo_lora_smollm2_es/checkpoint-1-44 --out models/demo_lora_merged

The base is the one the adapter records (adapter_config.json's base_model_name_or_path); a medsft checkpoint's
own model settings (medsft_config.yaml: attention, trust_remote_code, revision) are used to load it. The merged
model's logits equal base+adapter's up to float rounding. A QLoRA adapter is merged into the unquantised base.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from omegaconf import OmegaConf

from medsft.config import compose
from medsft.errors import ModelSourceError
from medsft.models import is_adapter_dir, torch_dtype
from medsft.models.merge import merge_to_folder

RUN_CONFIG = "medsft_config.yaml"  # the resolved config medsft.train.checkpoint saves in every checkpoint
DTYPES = ("auto", "float32", "bfloat16", "float16")


def cli_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="medsft merge", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="an adapter checkpoint folder (adapter_config.json + adapter weights)")
    parser.add_argument("--out", required=True, help="new folder for the merged model (absent or empty)")
    parser.add_argument("--dtype", choices=DTYPES, default="auto",
                        help="dtype of the merged weights (default: %(default)s = the base model's stored dtype)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    checkpoint = Path(args.checkpoint).expanduser().resolve()
    if not is_adapter_dir(checkpoint):
        raise ModelSourceError(f"{checkpoint}: not an adapter checkpoint (no adapter_config.json); a full "
                               "fine-tune's checkpoint is already a plain model")
    saved = checkpoint / RUN_CONFIG
    model_cfg = OmegaConf.load(saved).model if saved.is_file() else compose(["~experiment"]).model
    model_cfg.path = str(checkpoint)
    out = merge_to_folder(model_cfg, args.out, None if args.dtype == "auto" else torch_dtype(args.dtype))
    print(out)
    return 0
