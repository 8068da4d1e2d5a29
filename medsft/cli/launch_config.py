"""`medsft launch-config [overrides] --out DIR`: the accelerate (DeepSpeed / FSDP2) files of a composed config.

The files are for a GPU job started by hand (`accelerate launch --config_file ...`), so only an experiment preset
named on the command line applies: the CPU demo preset that `python launch.py` uses by default (lr 5e-4, batch 4,
2 epochs) is never taken silently. Without experiment=, the config is conf/'s defaults (the seed's values), and
the printed launch command carries `~experiment` so the training composes the same config.
"""

from __future__ import annotations

from pathlib import Path

from medsft.cli.usage import CommandParser, examples_block
from medsft.config import check_cli_overrides, compose, validate
from medsft.config.presets import NO_EXPERIMENT, describe_epochs, describe_experiment, named_experiment
from medsft.runtime.launch_config import launch_config_files

# Commands of README.md (tests/test_cli_help.py checks that each is there).
EXAMPLES = [
    ("medsft launch-config experiment=medical_o1_spanish_8gpu data.path=train.json --out launch_config",
     "the seed's 8-GPU ZeRO-3 run"),
    ("medsft launch-config deepspeed=zero3_8gpu launcher.num_processes=8 data.path=train.json --out launch_config",
     "the seed's values"),
    ("medsft launch-config launcher=multi_gpu data.path=train.json --out launch_config", "plain DDP on 8 GPUs"),
]


def cli_main(argv: list[str]) -> int:
    parser = CommandParser(
        prog="medsft launch-config",
        description="medsft launch-config: write accelerate_config.yaml (and deepspeed_config.json; with fsdp=... an "
                    "FSDP2 section) for the composed medsft config, for `accelerate launch --config_file "
                    "DIR/accelerate_config.yaml launch.py <same overrides>`. Only an experiment preset you name "
                    "applies (without experiment=: conf/'s defaults, the seed's values; never the CPU demo's).",
        epilog=examples_block(EXAMPLES),
    )
    parser.add_argument("overrides", nargs="*",
                        help="Hydra overrides, e.g. experiment=medical_o1_spanish_8gpu, deepspeed=zero3_8gpu "
                             "launcher.num_processes=8, or fsdp=full_shard")
    parser.add_argument("--out", default="launch_config", help="output folder (default ./launch_config)")
    args = parser.parse_args(argv)
    check_cli_overrides(args.overrides)
    named, preset = named_experiment(args.overrides)
    overrides = list(args.overrides) if named else [NO_EXPERIMENT, *args.overrides]
    cfg = compose(overrides)
    validate(cfg)
    written = launch_config_files(cfg, Path(args.out))
    t = cfg.train
    print(f"config: {describe_experiment(preset, True)}; lr {cfg.optimizer.learning_rate:g}, "
          f"{t.train_bsz_per_gpu} per device x {t.gradient_accumulation_steps} accumulation x "
          f"{cfg.launcher.num_processes} processes, {describe_epochs(t)}, seq {cfg.data.max_seq_len}, "
          f"deepspeed={cfg.deepspeed.name}")
    for kind, path in written.items():
        print(f"{kind:<11} {path}")
    print("\nrun with:\n  accelerate launch --config_file "
          f"{written['accelerate']} launch.py {' '.join(overrides)}")
    return 0
