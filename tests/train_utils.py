"""Helpers for tests that run the real training loop on the tiny random model."""

from __future__ import annotations

import fnmatch
import subprocess
import sys
import threading
from pathlib import Path

from huggingface_hub import HfApi
from huggingface_hub.hf_api import future_compatible

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


class RecordingHub(HfApi):
    """The real HfApi (its `run_as_future` queue, its `run_as_future=True` argument) with the network calls
    replaced: uploads are recorded, each can be held until released, and `fail` makes them raise."""

    def __init__(self, fail: bool = False):
        super().__init__(token=False)
        self.fail = fail
        self.release = threading.Event()
        self.calls: list[tuple] = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs.get("private")))

    @future_compatible
    def upload_folder(self, *, repo_id, folder_path, commit_message=None, ignore_patterns=None, **kwargs):
        self.release.wait(timeout=30)
        if self.fail:
            raise ConnectionError("hub unreachable")
        root = Path(folder_path)
        files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()
                       and not any(fnmatch.fnmatch(p.relative_to(root).as_posix(), pat) for pat in ignore_patterns))
        self.calls.append(("upload_folder", root.name, files, (root / "README.md").read_text(encoding="utf-8")))

    @future_compatible
    def upload_file(self, *, path_or_fileobj, path_in_repo, repo_id, commit_message=None, **kwargs):
        self.calls.append(("upload_file", path_in_repo, path_or_fileobj.decode("utf-8")))
