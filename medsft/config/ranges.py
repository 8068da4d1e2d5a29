"""The allowed range of every numeric key of the training config, and of the names and places a run writes to;
validation.py reports what these functions find, together with its other checks.

Hydra checks types (`seed=abc` fails at composition); these check values that type-check but cannot work: a
NaN or infinite float anywhere (also under `rl` and in lists), an LR of 1e12, betas outside [0, 1), a negative
seed, clipping or weight decay, an experiment_name that would write outside output_dir, an unknown
checkpoint.eval_benchmark.
"""

from __future__ import annotations

import math
import re
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any, Iterable, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf

from medsft.paths import CONF_DIR

SEED_MAX = 2**32 - 1  # numpy's seed range (accelerate's set_seed seeds numpy too)
LR_MAX = 1.0  # AdamW moves every weight by about the LR per step: above 1 it only destroys the model
PORT_MAX = 65535
NAME_MAX_BYTES = 200  # one folder name may not exceed 255 bytes; Hydra's run folder adds to it

# key: (low, low included, high, high included, what the bound means). None = unbounded on that side.
SFT_RANGES: dict[str, tuple[Optional[float], bool, Optional[float], bool, str]] = {
    "seed": (0, True, SEED_MAX, True, ""),
    "optimizer.learning_rate": (0, False, LR_MAX, True, "AdamW moves each weight by about the LR per step"),
    "optimizer.weight_decay": (0, True, None, True, ""),
    "optimizer.eps": (0, False, None, True, "added to AdamW's denominator; 0 divides zero gradients by zero"),
    "optimizer.max_grad_norm": (0, True, None, True, "0 = measured, not clipped"),
    "optimizer.warmup_rates": (0, True, 1, True, "a share of the optimizer steps"),
    "optimizer.min_lr_ratio": (0, True, 1, True, "a share of optimizer.learning_rate"),
    "model.loss_chunk_tokens": (1, True, None, True, "rows of hidden states the chunked loss projects at a time"),
    "data.max_samples": (0, True, None, True, "0 = all"),
    "data.num_workers": (0, True, None, True, ""),
    "data.num_proc": (0, True, None, True, "0 = one per CPU core (at most 8)"),
    "train.max_steps": (0, True, None, True, "0 = train.n_epochs over the data"),
    "train.max_consecutive_skips": (1, True, None, True, ""),
    "train.eval_every_n_steps": (0, True, None, True, "0 = only at the end"),
    "train.cpu_malloc_mmap_threshold_mb": (0, True, 32, True,
                                           "0 = glibc's dynamic threshold; glibc's ceiling is 32 MiB"),
    "checkpoint.every_n_steps": (0, True, None, True, "0 = only at epoch ends"),
    "checkpoint.eval_limit": (0, True, None, True, "0 = every question"),
    "checkpoint.eval_max_new_tokens": (1, True, None, True, ""),
    "generation_check.num_questions": (1, True, None, True, "to skip the check: generation_check.enabled=false"),
    "generation_check.max_new_tokens": (1, True, None, True, ""),
    "generation_check.batch_size": (1, True, None, True, ""),
    "generation_check.show_chars": (0, True, None, True, ""),
    "launcher.main_process_port": (0, True, PORT_MAX, True, "0 = a free port is picked"),
    "launcher.machine_rank": (0, True, None, True, ""),
    **{f"model.tiny.{k}": (1, True, None, True, "") for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "max_position_embeddings")},
}


def _interval(low, low_in, high, high_in) -> str:
    def fmt(v):
        return f"{v:g}" if isinstance(v, float) else str(v)

    if high is None:
        return f"{'>=' if low_in else '>'} {fmt(low)}"
    return f"in {'[' if low_in else '('}{fmt(low)}, {fmt(high)}{']' if high_in else ')'}"


def range_problems(cfg: DictConfig, ranges: dict = SFT_RANGES) -> list[str]:
    """`key=value must be ...` for every key of `ranges` whose value is outside its range."""
    problems = []
    for key, (low, low_in, high, high_in, why) in ranges.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value):  # non_finite_problems names it
            continue
        ok = value >= low if low_in else value > low
        if ok and high is not None:
            ok = value <= high if high_in else value < high
        if not ok:
            problems.append(f"{key}={value!r} must be {_interval(low, low_in, high, high_in)}"
                            + (f" ({why})" if why else ""))
    return problems


def _numbers(node: Any, prefix: str = "") -> Iterable[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _numbers(value, f"{prefix}{key}.")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _numbers(value, f"{prefix}{index}.")
    elif isinstance(node, float):
        yield prefix[:-1], node


def non_finite_problems(cfg: DictConfig) -> list[str]:
    """Every float of the config (any group, lists included) must be a finite number."""
    data = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    return [f"{key}={value!r} must be a finite number" for key, value in _numbers(data) if not math.isfinite(value)]


def betas_problems(betas: Any, key: str = "optimizer.betas") -> list[str]:
    values = list(betas) if isinstance(betas, (list, tuple, ListConfig)) else None
    if values is None or len(values) != 2:
        return [f"{key}={values if values is not None else betas!r} must be two numbers [beta1, beta2]"]
    bad = [v for v in values if not isinstance(v, (int, float)) or not (0.0 <= v < 1.0)]
    return [f"{key}={values} must be two numbers in [0, 1) (AdamW's moment decay rates)"] if bad else []


def launcher_problems(cfg: DictConfig) -> list[str]:
    rank, machines = cfg.launcher.machine_rank, cfg.launcher.num_machines
    if isinstance(rank, int) and isinstance(machines, int) and machines >= 1 and rank >= machines:
        return [f"launcher.machine_rank={rank} must be in [0, launcher.num_machines={machines})"]
    return []


def experiment_name_problems(name: Any) -> list[str]:
    """experiment_name names a folder under output_dir (and outputs/): never empty, absolute or `..`."""
    text = "" if name is None else str(name)
    if not text.strip():
        return ["experiment_name is empty; it names the checkpoint folder {output_dir}/{experiment_name}"]
    if text != text.strip() or any(ord(c) < 32 or c == "\x7f" for c in text):
        return [f"experiment_name={text!r} has surrounding blanks or control characters"]
    if text.startswith(("/", "\\", "~")) or PureWindowsPath(text).drive or "\\" in text:
        return [f"experiment_name={text!r} must be a name (or name/name) under output_dir, not a path of its own: "
                "put the location in output_dir"]
    parts = PurePosixPath(text).parts
    if any(p in ("", ".", "..") for p in text.split("/")) or not parts:
        return [f"experiment_name={text!r} must not contain '.', '..' or empty parts: it must name a folder "
                "inside {output_dir}/ (put the location in output_dir)"]
    if any(len(p.encode("utf-8")) > NAME_MAX_BYTES for p in parts):
        return [f"experiment_name is longer than {NAME_MAX_BYTES} bytes (folder names may not exceed 255)"]
    return []


def location_problems(cfg: DictConfig) -> list[str]:
    problems = []
    for key in ("output_dir", "log_dir"):
        value = OmegaConf.select(cfg, key, default=None)
        if value is None or not str(value).strip():
            problems.append(f"{key} is empty; it must name a directory")
    return problems


def eval_presets() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "eval").glob("*.yaml") if p.stem != "base")


def eval_benchmark_problems(name: Any) -> list[str]:
    """checkpoint.eval_benchmark names a conf/eval preset (or is null)."""
    if name in (None, ""):
        return []
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", str(name)) or str(name) not in eval_presets():
        return [f"checkpoint.eval_benchmark={name!r} is not a conf/eval preset; one of {eval_presets()} or null"]
    return []
