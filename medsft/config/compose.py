"""Composing a config from `conf/` outside `@hydra.main`: the one helper the CLIs (eval, data, launch-config,
prepare-model), the checkpoint eval and the tests share."""

from __future__ import annotations

from typing import Iterable

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from medsft.config.evaluate import EvaluateConfig
from medsft.config.help import register_help_resolver
from medsft.config.naming import register_resolvers
from medsft.config.rl import RLConfig
from medsft.config.schema import Config
from medsft.paths import CONF_DIR

TRAIN_SCHEMA = "medsft_schema"  # named first in conf/config.yaml's defaults list
EVAL_SCHEMA = "medsft_evaluate_schema"  # ... and in conf/evaluate.yaml's
RL_SCHEMA = "rl_schema"  # group rl; named first in conf/rl/base.yaml's


def register_configs() -> None:
    """Register the schemas so the conf/ files can name them in their defaults lists, and the resolvers they
    use (`${medsft_name:...}`, medsft.config.naming; the config groups listed by `--help`, medsft.config.help)."""
    register_resolvers()
    register_help_resolver()
    store = ConfigStore.instance()
    store.store(name=TRAIN_SCHEMA, node=Config)
    store.store(name=EVAL_SCHEMA, node=EvaluateConfig)
    store.store(group="rl", name=RL_SCHEMA, node=RLConfig)


def compose(overrides: Iterable[str] = (), config_name: str = "config", job_name: str = "medsft",
            return_hydra_config: bool = False) -> DictConfig:
    """The config `conf/<config_name>.yaml` composes to with these Hydra overrides (not validated);
    `return_hydra_config=True` keeps the `hydra` node a run would have.

    Any Hydra already initialised in this process (an enclosing composition) is cleared first: Hydra allows one.
    """
    register_configs()
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name=job_name):
        return hydra_compose(config_name=config_name, overrides=list(overrides),
                             return_hydra_config=return_hydra_config)
