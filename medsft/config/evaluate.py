"""Typed schema of `medsft eval`'s composed config (`conf/evaluate.yaml`): the `model` group of training (the same
ModelConfig, so `model=tiny_random` or `model.path=<checkpoint dir>` work) and an `eval` group (`conf/eval/*.yaml`:
which benchmark, where its data is, decoding settings). Types only: the values are in conf/eval/base.yaml and the
presets."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING

from medsft.config.schema import ModelConfig

EVAL_KINDS = ("huatuo_o1", "headqa_es", "casimedicos_es", "huatuo_format")


@dataclass
class VllmConfig:
    tensor_parallel_size: int = MISSING
    gpu_memory_utilization: float = MISSING
    max_model_len: Optional[int] = MISSING


@dataclass
class EvalConfig:
    name: str = MISSING
    kind: str = MISSING
    path: str = MISSING
    subsets: list[str] = MISSING
    splits: list[str] = MISSING
    categories: list[str] = MISSING
    skip_images: bool = MISSING
    language: str = MISSING
    prompt_template: Optional[str] = MISSING
    system_prompt: Optional[str] = MISSING
    limit: int = MISSING
    sample_seed: Optional[int] = MISSING
    max_new_tokens: int = MISSING
    batch_size: int = MISSING
    do_sample: bool = MISSING
    temperature: float = MISSING
    top_p: float = MISSING
    repetition_penalty: float = MISSING
    seed: int = MISSING
    backend: str = MISSING
    device: str = MISSING
    compat_huatuo: bool = MISSING
    output_dir: Optional[str] = MISSING
    progress: bool = MISSING
    vllm: VllmConfig = field(default_factory=VllmConfig)


@dataclass
class EvaluateConfig:
    defaults: list[Any] = field(default_factory=list)
    model: ModelConfig = field(default_factory=ModelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
