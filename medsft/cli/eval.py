"""`medsft eval [--compat-huatuo] [--cfg] [overrides...]`: Hydra-composed evaluation (conf/evaluate.yaml).

Composes `conf/evaluate.yaml` (config dir = the project's `conf/`, same `model` group as training) with Hydra's
compose API, so typos and wrong types fail before any model is loaded.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from omegaconf import OmegaConf

from medsft.cli.usage import examples_block
from medsft.config.secrets import ENV_HINT, secret_override_problems
from medsft.errors import ConfigError
from medsft.eval.config import compose_eval_config
from medsft.eval.runner import print_summary, run_evaluation
from medsft.paths import REPO_ROOT, SHARED_DATA_ENV

# The demo's final checkpoint (`python launch.py`: experiment demo_smollm2-135m-instruct_demo_data, train.max_steps=48 of 2 epochs).
DEMO_CHECKPOINT = "ckpts/demo_smollm2-135m-instruct_demo_data/checkpoint-1-48"
# Commands of README.md (tests/test_cli_help.py checks that each is there).
EXAMPLES = [
    (f"medsft eval model.path={DEMO_CHECKPOINT} eval=headqa_es eval.limit=200", "the demo's checkpoint, 200 MIR questions"),
    ("medsft eval model=smollm2_135m eval=huatuo_o1 'eval.subsets=[MedQA_USLME_test,PubMedQA_test]'",
     "the base model, HuatuoGPT-o1's sets"),
    (f"medsft eval model.path={DEMO_CHECKPOINT} eval=casimedicos_es", "Spanish clinical cases"),
    (f"medsft eval model.path={DEMO_CHECKPOINT} eval=custom eval.path=my_questions.json eval.language=es",
     "your own file, no shared data"),
]


def usage() -> str:
    """The help text: what it does, where the benchmark data must be (and whether it is there now), examples."""
    env = os.environ.get(SHARED_DATA_ENV)
    where = Path(env).expanduser() if env else Path("../shared/data")
    # Relative paths are read from this folder, else from the project root (medsft.eval.benchmarks).
    found = next((p.resolve() for p in ([where] if where.is_absolute() else [where, REPO_ROOT / where])
                  if p.is_dir()), None)
    state = f"found ({found})" if found else "NOT FOUND: set it before running a preset other than eval=custom"
    shown = f"${SHARED_DATA_ENV}={env}" if env else f"${SHARED_DATA_ENV} is not set, so {where}"
    return "\n".join([
        "medsft eval: evaluate a model (a fine-tuned checkpoint, a Hub id, the embedded SmolLM2) on medical",
        "multiple-choice benchmarks with the honest scorer; writes predictions.jsonl, summary.json and summary.md",
        "(accuracy with its 95% Wilson interval) under outputs/eval/<model>/<time>/.",
        "",
        "usage: medsft eval [key=value ...] [--compat-huatuo] [--cfg]",
        "",
        f"Benchmark data is not part of medsft: the presets read ${SHARED_DATA_ENV} (default ../shared/data).",
        f"  now: {shown}: {state}",
        "  Each conf/eval/<preset>.yaml says where to get its files; eval=custom eval.path=FILE needs none.",
        "  Fine-tuning checkpoints are <output_dir>/<experiment_name>/checkpoint-<epoch>-<step>/ (the demo's last one:",
        f"  {DEMO_CHECKPOINT}).",
        "",
        examples_block(EXAMPLES),
        "",
        "options:",
        "  --compat-huatuo   also score with HuatuoGPT-o1's optimistic rules (labelled; to compare with the paper)",
        "  --cfg             print the composed config and exit",
        "  -h, --help        this text",
        "presets (eval=...): huatuo_o1 (default), headqa_es, casimedicos_es, custom; any key: eval.limit=50, "
        "eval.max_new_tokens=512, eval.batch_size=8, eval.repetition_penalty=1.1, eval.output_dir=DIR",
    ])


def cli_main(argv: list[str]) -> int:
    argv = list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(usage())
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
