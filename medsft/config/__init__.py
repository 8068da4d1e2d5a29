"""The config: typed schemas (schema.py: training; rl.py: stage 2; evaluate.py: `medsft eval`), the checks Hydra
cannot express (validation.py; data.py for the data group's formats and mixture), command-line overrides checked against the schema (overrides.py), composition
outside `@hydra.main` (compose.py) and plain-data views of a config (tree.py). Values live in `conf/`."""

from medsft.config.compose import compose, register_configs
from medsft.config.overrides import check_cli_overrides, unknown_override_keys
from medsft.config.schema import Config, DataConfig, FieldMap, ModelConfig, TinyModelShape
from medsft.config.tree import flatten, to_plain_dict
from medsft.config.validation import validate, validate_eval, validate_rl

__all__ = [
    "Config", "DataConfig", "FieldMap", "ModelConfig", "TinyModelShape", "check_cli_overrides", "compose",
    "flatten", "register_configs", "to_plain_dict", "unknown_override_keys", "validate", "validate_eval",
    "validate_rl",
]
