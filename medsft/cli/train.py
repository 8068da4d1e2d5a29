"""`medsft train [overrides]`: the same as `python launch.py [overrides]`."""

from __future__ import annotations

import sys

import hydra

from medsft.config import check_cli_overrides, register_configs
from medsft.paths import CONF_DIR
from medsft.run import run_from_hydra


def cli_main(argv: list[str]) -> int:
    check_cli_overrides(argv)  # secrets and unknown keys, before Hydra writes anything (also run by `medsft`)
    register_configs()
    sys.argv = ["medsft train", *argv]
    hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")(run_from_hydra)()
    return 0
