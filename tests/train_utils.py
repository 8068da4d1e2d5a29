"""Helpers for tests that run the real training loop on the tiny random model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from medsft.config import compose

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def tiny_overrides(tmp_path: Path, *extra: str) -> list[str]:
    """A CPU-sized run of tiny-random on the bundled demo data, writing only under tmp_path."""
    return [
        "model=tiny_random",
        "logging=none",
        "generation_check.enabled=false",
        f"output_dir={tmp_path / 'ckpts'}",
        f"log_dir={tmp_path / 'logs'}",
        "experiment_name=tiny",
        "data.max_seq_len=1024",
        # A seeded 48-record subset of the bundled file: 42 train / 6 val, the sizes the step counts assume.
        "data.max_samples=48",
        "data.val_ratio=0.125",
        "optimizer.learning_rate=3e-3",
        "train.train_bsz_per_gpu=4",
        "train.gradient_accumulation_steps=1",
        "train.n_epochs=1",
        "logging.progress_bar=false",
        # fp32 whatever the CPU: bitwise resume and loss-equality assertions hold in fp32 (auto = bf16 on a CPU
        # with native bf16 units).
        "train.mixed_precision=no",
        *extra,
    ]


def compose_cfg(overrides: list[str]):
    """The composed training config (medsft.config.compose, what the `compose_config` fixture calls)."""
    return compose(overrides)


def reset_accelerate() -> None:
    """accelerate keeps process-wide singletons; tests that build several Accelerators reset them."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()


def train_in_process(tmp_path: Path, *extra: str, run_dir: Path | None = None):
    """Compose + run the SFT stage in this process; returns (objective, run_dir)."""
    from medsft.run import run

    reset_accelerate()
    cfg = compose_cfg(tiny_overrides(tmp_path, *extra))
    run_dir = run_dir or (tmp_path / "run")
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        objective = run(cfg, run_dir)
    finally:
        reset_accelerate()
    return objective, run_dir


def launch(*args: str, env: dict | None = None, timeout: int = 600, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "launch.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env)
