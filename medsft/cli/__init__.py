"""`medsft` console script: one subcommand per job; each lives in its own module of this package."""

from __future__ import annotations

import importlib
import sys

from medsft.cli.usage import examples_block, version_text
from medsft.errors import MedsftError
from medsft.runtime.quiet import quiet_third_party_logs
from medsft.runtime.startup import exit_on_sigterm

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

EXAMPLES = [
    ("medsft data show data/demo_data.json --index 0 --model tiny-random:llama", "loss-carrying part marked"),
    ("medsft data check data/demo_data.json", "exit 0 valid / 1 invalid"),
    ("medsft eval model.path=ckpts/demo_smollm2-135m-instruct_demo_data/checkpoint-1-48 eval=headqa_es eval.limit=200", ""),
    ("medsft sweep-report multirun_outputs/<date>/<time>", ""),
]


def _usage() -> str:
    lines = ["medsft: fine-tune causal LMs on medical chain-of-thought data (HuatuoGPT-o1's recipe, Spanish first),",
             "evaluate them, and look at the data first.", "",
             "usage: medsft <command> [args]      (medsft <command> --help: what it does, with examples)",
             "       medsft --version", "", "commands:"]
    lines += [f"  {name:<15} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    return "\n".join([*lines, "", examples_block(EXAMPLES)])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(version_text(full="--verbose" in argv or "-v" in argv))
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"medsft: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    if name == "train":  # before its imports (torch: seconds): a SIGTERM during start-up exits 75 (runtime/startup.py)
        exit_on_sigterm()
    quiet_third_party_logs()
    module = importlib.import_module(SUBCOMMANDS[name][0])
    try:
        return int(module.cli_main(rest) or 0)
    except MedsftError as err:
        print(f"medsft {name}: error: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
