"""`medsft launch-config [overrides] --out DIR`: the accelerate (DeepSpeed / FSDP2) files of a composed config."""

from __future__ import annotations

import argparse
from pathlib import Path

from medsft.config import compose, validate
from medsft.runtime.launch_config import launch_config_files


def cli_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="medsft launch-config",
        description="Write accelerate_config.yaml (and deepspeed_config.json; with fsdp=... an FSDP2 section) for the "
                    "composed medsft config, "
                    "for `accelerate launch --config_file DIR/accelerate_config.yaml launch.py <same overrides>`.",
    )
    parser.add_argument("overrides", nargs="*",
                        help="Hydra overrides, e.g. deepspeed=zero3_8gpu launcher.num_processes=8, or fsdp=full_shard")
    parser.add_argument("--out", default="launch_config", help="output folder (default ./launch_config)")
    args = parser.parse_args(argv)
    cfg = compose(args.overrides)
    validate(cfg)
    written = launch_config_files(cfg, Path(args.out))
    for kind, path in written.items():
        print(f"{kind:<11} {path}")
    print("\nrun with:\n  accelerate launch --config_file "
          f"{written['accelerate']} launch.py {' '.join(args.overrides)}")
    return 0
