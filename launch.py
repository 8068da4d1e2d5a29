"""medsft entry point: compose the Hydra config, validate it, hand it to the package.

    python launch.py                                   # CPU demo on the embedded SmolLM2 model
    python launch.py experiment=local_test model.path=meta-llama/Llama-3.2-1B-Instruct
    python launch.py --multirun optimizer.learning_rate=1e-5,5e-6
"""

import sys

import hydra
from omegaconf import DictConfig

from medsft.config import check_cli_overrides, register_configs
from medsft.run import run_from_hydra

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    return run_from_hydra(cfg)


if __name__ == "__main__":
    check_cli_overrides(sys.argv[1:])
    main()
