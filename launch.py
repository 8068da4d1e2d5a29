"""medsft entry point: compose the Hydra config, validate it, hand it to the package.

    python launch.py                                   # CPU demo on the embedded SmolLM2 model
    python launch.py experiment=local_test model.path=meta-llama/Llama-3.2-1B-Instruct
    python launch.py --multirun optimizer.learning_rate=1e-5,5e-6
"""

import sys

from medsft.runtime.startup import exit_on_sigterm

exit_on_sigterm()  # first: a SIGTERM during the imports, data or model load exits 75 (medsft/runtime/startup.py)

if __name__ == "__main__":  # secrets and unknown keys: refused before Hydra writes anything (and before torch loads)
    from medsft.config.overrides import check_cli_overrides

    check_cli_overrides(sys.argv[1:])

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from medsft.config import register_configs  # noqa: E402
from medsft.run import run_from_hydra  # noqa: E402

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    return run_from_hydra(cfg)


if __name__ == "__main__":
    main()
