"""`medsft` console script: one subcommand per job; each lives in its own module of this package."""

from __future__ import annotations

import importlib
import sys

from medsft.errors import MedsftError

# subcommand -> (module, one-line help). Modules are imported only for the command that runs: `medsft --help`
# is instant and `medsft data check` never imports torch (training's imports take ~5 s).
SUBCOMMANDS = {
    "train": ("medsft.cli.train", "train (same as `python launch.py ...`, Hydra overrides)"),
    "data": ("medsft.cli.data", "check / stats / sample / show a data file"),
    "eval": ("medsft.cli.eval", "evaluate a model on medical benchmarks (Hydra overrides)"),
    "merge": ("medsft.cli.merge", "merge an adapter checkpoint (LoRA/DoRA/QLoRA) into its base: a plain HF model"),
    "prepare-model": ("medsft.cli.prepare_model", "prepare a model (e.g. the embedded SmolLM2) into the local cache"),
    "sweep-report": ("medsft.cli.sweep_report", "table (md + csv) and PNG plots of a multirun folder"),
    "launch-config": ("medsft.cli.launch_config",
                      "accelerate config YAML + DeepSpeed JSON of a composed config (--out DIR)"),
}


def _usage() -> str:
    lines = ["usage: medsft <command> [args]", "", "commands:"]
    lines += [f"  {name:<15} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"medsft: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    try:
        return int(module.cli_main(rest) or 0)
    except MedsftError as err:
        print(f"medsft {name}: error: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
