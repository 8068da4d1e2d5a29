"""`medsft eval [--compat-huatuo] [--cfg] [overrides...]`: Hydra-composed evaluation.

    medsft eval model=tiny_random eval=headqa_es eval.limit=200 eval.max_new_tokens=512
    medsft eval model.path=ckpts/my_run/final eval=casimedicos_es
    medsft eval eval=huatuo_o1 'eval.subsets=[MedQA_USLME_test,PubMedQA_test]' --compat-huatuo
    medsft eval eval=custom eval.path=my_questions.json eval.language=es

Composes `conf/evaluate.yaml` (config dir = the project's `conf/`, same `model` group as training) with
Hydra's compose API, so typos and wrong types fail before any model is loaded.
"""

from __future__ import annotations

import logging
import sys

from omegaconf import OmegaConf

from medsft.config.secrets import ENV_HINT, secret_override_problems
from medsft.errors import ConfigError
from medsft.eval.config import compose_eval_config
from medsft.eval.runner import print_summary, run_evaluation

USAGE = __doc__


def cli_main(argv: list[str]) -> int:
    argv = list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    overrides, print_cfg = [], False
    for a in argv:
        if a in ("--compat-huatuo", "--compat_huatuo"):
            overrides.append("eval.compat_huatuo=true")
        elif a in ("--cfg", "--print-config"):
            print_cfg = True
        elif a.startswith("-"):
            raise ConfigError(f"unknown option {a!r}; options: --compat-huatuo, --cfg, -h (overrides are key=value)")
        else:
            overrides.append(a)
    secrets = secret_override_problems(overrides)
    if secrets:  # refused before anything is composed or written (the config lands in the output folder)
        raise ConfigError("\n  ".join([*secrets, ENV_HINT]))
    cfg = compose_eval_config(overrides)
    if print_cfg:
        print(OmegaConf.to_yaml(cfg))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    out = run_evaluation(cfg)
    print_summary(out)
    print(f"wrote {out / 'predictions.jsonl'}, {out / 'summary.json'}, {out / 'summary.md'}")
    return 0
