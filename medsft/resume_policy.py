"""What `resume.from_checkpoint` means and when a resume is refused, for every stage (SFT: medsft.train.resume,
RL: medsft.rl.resume). Each stage knows its own checkpoints; the choice, the comparison of configs and the
messages are the same for both.

resume.from_checkpoint:
    auto (default)  the newest complete checkpoint of the experiment, else a fresh start
    never           a fresh start; refused when the checkpoint folder already holds checkpoints, unless
                    resume.overwrite=true
    <path>          that checkpoint
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from omegaconf import OmegaConf

from medsft.config import flatten, to_plain_dict
from medsft.errors import ConfigError

FRESH = "fresh"
AUTO = "auto"
PATH = "path"
_FRESH_WORDS = ("never", "false", "no", "none", "")
_AUTO_WORDS = ("auto", "true", "yes", "latest")


def resume_choice(from_checkpoint) -> str:
    """FRESH, AUTO or PATH for a `resume.from_checkpoint` value."""
    word = str(from_checkpoint).strip().lower()
    if word in _FRESH_WORDS:
        return FRESH
    if word in _AUTO_WORDS:
        return AUTO
    return PATH


def refuse_fresh_start(resume_cfg, root: Path, existing: list[Path]) -> None:
    """A fresh start must not write among another run's checkpoints (rotation, a later resume=auto would mix
    them): refused unless resume.overwrite=true."""
    if existing and not resume_cfg.overwrite:
        choice = str(resume_cfg.from_checkpoint).strip() or "never"
        raise ConfigError(
            f"resume.from_checkpoint={choice} but {root} already holds {len(existing)} checkpoint(s) (newest "
            f"{existing[-1].name}); pass resume.overwrite=true to delete them and start fresh there, "
            "resume.from_checkpoint=auto to continue, or change experiment_name / output_dir"
        )


def config_differences(saved: dict, current: dict) -> list[str]:
    """`key: checkpoint X != now Y` for every key whose value differs between two flat dicts."""
    return [f"{key}: checkpoint {saved.get(key)!r} != now {current.get(key)!r}"
            for key in sorted(set(saved) | set(current)) if saved.get(key) != current.get(key)]


def without(flat: dict, ignored_prefixes: Iterable[str]) -> dict:
    """`flat` minus the keys equal to, or under, any of the dotted prefixes."""
    prefixes = tuple(ignored_prefixes)
    return {k: v for k, v in flat.items() if not any(k == p or k.startswith(p + ".") for p in prefixes)}


def saved_config_differences(config_file: Path, cfg, ignored_prefixes: Iterable[str]) -> list[str]:
    """Differences between the config saved in a checkpoint and this run's, outside the ignored keys."""
    if not Path(config_file).is_file():
        return []
    saved = without(flatten(OmegaConf.to_container(OmegaConf.load(config_file), resolve=True)), ignored_prefixes)
    now = without(flatten(to_plain_dict(cfg)), ignored_prefixes)
    return config_differences(saved, now)


def refuse_inexact(path: Path, differences: list[str], resume_cfg) -> None:
    """A resume that would not continue the same computation is refused, naming what differs, unless
    resume.allow_config_change=true."""
    if differences and not resume_cfg.allow_config_change:
        raise ConfigError(
            f"cannot resume exactly from {path}: the run differs in\n  - " + "\n  - ".join(differences)
            + f"\n{Path(path).parent} holds the checkpoints of a run with another config under the same "
              "experiment_name. To run this one separately, give it its own name (experiment_name=<name>) or "
              "output_dir; to continue that run with this config, pass resume.allow_config_change=true; to replace "
              "it, resume.from_checkpoint=never resume.overwrite=true (deletes its checkpoints)"
        )
