"""Typed schema of `medsft eval`'s composed config (`conf/evaluate.yaml`): the `model` group of training
(same ModelConfig, so `model=tiny_random` or `model.path=<checkpoint dir>` work) and an `eval` group
(`conf/eval/*.yaml`: which benchmark, where its data is, decoding settings)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from medsft.config import ModelConfig
from medsft.errors import ConfigError


@dataclass
class VllmConfig:
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    max_model_len: Optional[int] = None


@dataclass
class EvalConfig:
    name: str = "huatuo_o1"
    # huatuo_o1 | headqa_es | casimedicos_es | huatuo_format (a user file in the HuatuoGPT format)
    kind: str = "huatuo_o1"
    path: str = MISSING  # each conf/eval preset names its default location
    subsets: list[str] = field(default_factory=list)  # huatuo_o1 / huatuo_format: benchmark names; [] = all
    splits: list[str] = field(default_factory=list)  # headqa_es / casimedicos_es; [] = the preset's default
    categories: list[str] = field(default_factory=list)  # headqa_es: e.g. [medicine]; [] = all
    skip_images: bool = True  # headqa_es: skip questions that refer to an image (counted in the report)
    language: str = "en"  # en | es: the prompt language for huatuo_format files
    prompt_template: Optional[str] = None  # overrides the per-language prompt; {question} {option_str}
    system_prompt: Optional[str] = None
    limit: int = 0  # questions per benchmark; 0 = all
    sample_seed: Optional[int] = 0  # limit picks a seeded random subset (file order kept); null = the first N
    # Decoding. Greedy by default (reproducible). HuatuoGPT-o1 used 2000 new tokens.
    max_new_tokens: int = 2000
    batch_size: int = 8
    do_sample: bool = False
    temperature: float = 0.6
    top_p: float = 0.9
    repetition_penalty: float = 1.0  # 1.0 = none; > 1 discourages verbatim loops (small models, greedy)
    seed: int = 42
    backend: str = "transformers"  # transformers | vllm (optional extra, GPU)
    device: str = "auto"  # auto (cuda when available) | cpu | cuda
    # Also score with HuatuoGPT-o1's optimistic rules (labelled "HuatuoGPT-compat (optimistic)"); the CLI
    # flag --compat-huatuo sets it.
    compat_huatuo: bool = False
    output_dir: Optional[str] = None  # default outputs/eval/<model name>/<timestamp>
    progress: bool = True
    vllm: VllmConfig = field(default_factory=VllmConfig)


@dataclass
class EvaluateConfig:
    defaults: list[Any] = field(default_factory=list)
    model: ModelConfig = field(default_factory=ModelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


SCHEMA_NAME = "medsft_evaluate_schema"


def register_eval_configs() -> None:
    """Register the schema so `conf/evaluate.yaml` can name it first in its defaults list."""
    ConfigStore.instance().store(name=SCHEMA_NAME, node=EvaluateConfig)


_CHOICES = {
    "eval.kind": ("huatuo_o1", "headqa_es", "casimedicos_es", "huatuo_format"),
    "eval.language": ("en", "es"),
    "eval.backend": ("transformers", "vllm"),
    "eval.device": ("auto", "cpu", "cuda"),
    "model.dtype": ("auto", "float32", "bfloat16", "float16"),
}


def validate_eval(cfg: DictConfig | Any) -> None:
    """Cross-field checks of an evaluate config (or of a bare `eval` node); ConfigError names the key."""
    root = cfg if OmegaConf.select(cfg, "eval") is not None else OmegaConf.create({"eval": cfg})
    problems = []
    for key, allowed in _CHOICES.items():
        value = OmegaConf.select(root, key)
        if value is not None and value not in allowed:
            problems.append(f"{key}={value!r} is not one of {list(allowed)}")
    e = root.eval
    for key in ("max_new_tokens", "batch_size"):
        if e[key] is None or e[key] < 1:
            problems.append(f"eval.{key}={e[key]!r} must be >= 1")
    if e.limit is None or e.limit < 0:
        problems.append(f"eval.limit={e.limit!r} must be >= 0 (0 = all)")
    if e.do_sample:
        if not e.temperature or e.temperature <= 0:
            problems.append(f"eval.temperature={e.temperature} must be > 0 with eval.do_sample=true")
        if not 0 < e.top_p <= 1:
            problems.append(f"eval.top_p={e.top_p} must be in (0, 1]")
    if e.repetition_penalty is None or e.repetition_penalty <= 0:
        problems.append(f"eval.repetition_penalty={e.repetition_penalty!r} must be > 0 (1.0 = none)")
    if not e.path:
        problems.append("eval.path must name the benchmark file or folder")
    if e.prompt_template and "{question}" not in e.prompt_template:
        problems.append("eval.prompt_template must contain {question} (and usually {option_str})")
    if problems:
        raise ConfigError("invalid eval config:\n  - " + "\n  - ".join(problems))
