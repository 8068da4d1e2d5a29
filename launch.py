"""medsft entry point: compose the Hydra config, validate it, hand it to the package (= `medsft train`).

    python launch.py                                   # CPU demo on the embedded SmolLM2 model
    python launch.py experiment=local_test model.path=meta-llama/Llama-3.2-1B-Instruct
    python launch.py --multirun optimizer.learning_rate=1e-5,5e-6
    python launch.py --help                            # what it does, examples, the config groups
"""

import sys

from medsft.runtime.startup import exit_on_sigterm

exit_on_sigterm()  # first: a SIGTERM during the imports, data or model load exits 75 (medsft/runtime/startup.py)

from medsft.cli.train import cli_main  # noqa: E402  (no torch: the override check runs before heavy imports)

if __name__ == "__main__":
    sys.exit(cli_main(sys.argv[1:], prog="launch.py"))
