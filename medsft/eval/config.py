"""The composed, validated config of `medsft eval` (`conf/evaluate.yaml`: the `model` group of training and an
`eval` group), for the CLI and the checkpoint eval alike."""

from __future__ import annotations

from typing import Iterable

from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from medsft.config import compose, validate_eval
from medsft.errors import ConfigError
from medsft.paths import CONF_DIR


def compose_eval_config(overrides: Iterable[str] = ()) -> DictConfig:
    """The composed, resolved and validated evaluate config (typed by medsft.config.evaluate.EvaluateConfig)."""
    if not (CONF_DIR / "evaluate.yaml").exists():
        raise ConfigError(f"{CONF_DIR}/evaluate.yaml not found (medsft eval needs the project's conf/ folder)")
    try:
        cfg = compose(overrides, config_name="evaluate", job_name="medsft_eval")
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            raise ConfigError(
                "missing required value(s): " + ", ".join(missing) + " (e.g. eval.path=/path/to/questions.json)"
            )
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(f"cannot compose the eval config: {err}") from None
    validate_eval(cfg)
    return cfg
