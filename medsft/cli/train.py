"""`medsft train [overrides]` and `python launch.py [overrides]`: one entry, the same arguments, the same checks.

Before Hydra composes anything: `--version`, then the override check (an unknown key names the allowed keys and
a likely correction, exit 2). Then Hydra: `--help` prints conf/hydra/help/medsft.yaml (what a run does, README
examples, the config groups), `--cfg job` the composed config, otherwise the run (medsft.run). Both commands
log to `launch.log` in the run folder (conf/config.yaml names the job `launch`).
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from medsft.cli.usage import version_text
from medsft.config import check_cli_overrides, register_configs
from medsft.paths import CONF_DIR
from medsft.runtime.quiet import quiet_third_party_logs
from medsft.sweep import register_resolvers as register_sweep_resolvers


def _run(cfg: DictConfig):
    # torch + transformers + accelerate (~5 s of imports): only when a run starts, not for --help / --cfg.
    from medsft.run import run_from_hydra

    return run_from_hydra(cfg)


def cli_main(argv: list[str], prog: str = "medsft train") -> int:
    argv = list(argv)
    if "--version" in argv or "-V" in argv:
        print(version_text(full=True))
        return 0
    check_cli_overrides(argv)  # secrets and unknown keys, before Hydra writes anything
    quiet_third_party_logs()
    register_configs()
    register_sweep_resolvers()  # before Hydra: a multirun resolves hydra.sweep.subdir (${medsft_dirname:...}) first
    sys.argv = [prog, *argv]
    hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")(_run)()
    return 0
