"""`medsft prepare-model [SOURCE]`: prepare a model into the local cache and print its directory."""

from __future__ import annotations

import argparse
import logging

from medsft.config import compose
from medsft.models import ALLOWED_SOURCES, EMBEDDED_SMOLLM2, resolve_model_dir, snapshot_hub_model
from medsft.models.load import is_hub_id


def cli_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="medsft prepare-model",
        description="Prepare a model into the local cache and print its directory.",
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
