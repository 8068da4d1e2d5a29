"""Which experiment preset a command line composes with, and whether it was named.

conf/config.yaml ends its defaults list with `experiment: demo`: `python launch.py` alone is the CPU demo. That
preset changes the seed's hyperparameters for a 135M model on 2 CPU cores (lr 5e-4, batch 4, 2 epochs, seq
512), so a command that is not the demo must not take them silently: `medsft launch-config` applies only a preset
it is given, and a training run with the implicit demo preset on several processes or DeepSpeed is warned.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

import yaml

from medsft.paths import CONF_DIR

EXPERIMENT = "experiment"
NO_EXPERIMENT = f"~{EXPERIMENT}"  # the override that composes conf/'s defaults alone (the seed's values)


def default_choices(conf_dir: Path = CONF_DIR) -> dict[str, str]:
    """The option conf/config.yaml's defaults list picks for each group (`null` ones left out)."""
    data = yaml.safe_load((conf_dir / "config.yaml").read_text(encoding="utf-8")) or {}
    chosen = {}
    for entry in data.get("defaults", []):
        if isinstance(entry, dict):
            for group, option in entry.items():
                if option is not None and not str(group).startswith(("override", "hydra")):
                    chosen[str(group)] = str(option)
    return chosen


def named_experiment(overrides: Iterable[str]) -> tuple[bool, Optional[str]]:
    """(whether the overrides name the experiment, the preset they pick): `experiment=x` / `+experiment=x`
    -> (True, "x"); `~experiment` or `experiment=null` -> (True, None); nothing -> (False, None)."""
    named, preset = False, None
    for override in overrides:
        key, sep, value = str(override).partition("=")
        if key.strip() == NO_EXPERIMENT:
            named, preset = True, None
        elif sep and key.strip().lstrip("+") == EXPERIMENT:
            value = value.strip()
            named, preset = True, (None if value in ("", "null", "none", "None") else value)
    return named, preset


def experiment_of(overrides: Iterable[str]) -> tuple[Optional[str], bool]:
    """(the experiment preset these overrides compose with, whether it was named); an unnamed one is
    conf/config.yaml's default (the CPU demo)."""
    named, preset = named_experiment(overrides)
    if named:
        return preset, True
    return default_choices().get(EXPERIMENT), False


def describe_epochs(train_cfg) -> str:
    """`2 epochs`, or `2 epochs capped at 48 steps` when train.max_steps ends the run first."""
    capped = f" capped at {train_cfg.max_steps} steps" if train_cfg.max_steps else ""
    return f"{train_cfg.n_epochs} epochs{capped}"


def describe_experiment(preset: Optional[str], named: bool) -> str:
    """`experiment=demo (the default: no experiment= given)`, `experiment=local_test`, or the seed's values."""
    if preset is None:
        return "no experiment preset: conf/'s defaults, the seed's values"
    return f"experiment={preset}" + ("" if named else " (the default: no experiment= given)")


def experiment_notice(cfg, overrides: Iterable[str]) -> tuple[str, Optional[str]]:
    """(the line a run logs about its experiment preset, a warning or None). The warning: the CPU demo preset
    applies only because no experiment= was given, to a run on several processes or with DeepSpeed."""
    preset, named = experiment_of(overrides)
    line = "config: " + describe_experiment(preset, named)
    big = int(cfg.launcher.num_processes) > 1 or int(cfg.launcher.num_machines) > 1 or bool(cfg.deepspeed.enabled)
    if named or preset != default_choices().get(EXPERIMENT) or not big:
        return line, None
    t = cfg.train
    return line, (
        f"this {cfg.launcher.num_processes}-process{' DeepSpeed' if cfg.deepspeed.enabled else ''} run takes the "
        f"CPU demo preset's hyperparameters because no experiment= was given (lr {cfg.optimizer.learning_rate:g}, "
        f"{t.train_bsz_per_gpu} per device x {t.gradient_accumulation_steps} accumulation, {describe_epochs(t)}, "
        f"seq {cfg.data.max_seq_len}); name a preset (experiment=medical_o1_spanish_8gpu) or pass ~experiment "
        f"for the seed's values"
    )
