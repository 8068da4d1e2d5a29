"""What `python launch.py --help` (and `medsft train --help`) lists: the config groups a training run can pick
and their options, read from `conf/` itself so the list never goes stale.

conf/hydra/help/medsft.yaml is the help page; its `${medsft_config_groups:}` is this module's
`config_groups_text`, registered as an OmegaConf resolver by `register_help_resolver` (medsft.config.compose).
Left out: the `eval` group (composed by `medsft eval`, not by a training run), Hydra's own groups, and each
group's `base` file (the defaults a preset starts from, not an option).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from medsft.config.presets import default_choices
from medsft.paths import CONF_DIR

RESOLVER = "medsft_config_groups"
# Folders of conf/ that are not training-run groups.
NOT_TRAINING_GROUPS = ("hydra", "eval")
NOT_OPTIONS = ("base",)


def training_groups(conf_dir: Path = CONF_DIR) -> dict[str, list[str]]:
    """{group: [options]} of conf/ for a training run, nested groups as `rl/data`, sorted."""
    groups: dict[str, list[str]] = {}
    for folder in sorted(p for p in conf_dir.rglob("*") if p.is_dir()):
        group = folder.relative_to(conf_dir).as_posix()
        if group.split("/", 1)[0] in NOT_TRAINING_GROUPS:
            continue
        options = sorted(p.stem for p in folder.glob("*.yaml") if p.stem not in NOT_OPTIONS)
        if options:
            groups[group] = options
    return groups


def config_groups_text(conf_dir: Path = CONF_DIR) -> str:
    """One line per group with a choice (`  model          smollm2_135m (default), tiny_random, ...`), then the
    groups that are one file of keys (`train/default.yaml`: nothing to choose, set train.n_epochs=...)."""
    defaults = default_choices(conf_dir)
    groups = training_groups(conf_dir)
    single = [g for g, options in groups.items() if options == ["default"]]
    width = max(len(g) for g in groups) + 2
    lines = []
    for group, options in groups.items():
        if group not in single:
            shown = [f"{o} (default)" if defaults.get(group) == o else o for o in options]
            lines.append(f"  {group:<{width}}{', '.join(shown)}")
    if single:
        lines.append(f"  one file of keys each (set them, e.g. train.n_epochs=2): {', '.join(single)}")
    return "\n".join(lines)


def register_help_resolver() -> None:
    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, lambda: config_groups_text())
