"""Where medsft's own files are: the project root, its `conf/` tree, the bundled data, the caches.

Computed once here; every other module asks this one.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"
BUNDLED_DATA_DIR = REPO_ROOT / "data"
DEMO_DATA = BUNDLED_DATA_DIR / "demo_data.json"
# Public benchmark data lives beside the project (../shared/data) unless $MEDSFT_SHARED_DATA says elsewhere.
SHARED_DATA_ENV = "MEDSFT_SHARED_DATA"


def cache_home() -> Path:
    """`$MEDSFT_CACHE`, else `~/.cache/medsft`: models in its `models/`, tokenized data in its `data/`."""
    env = os.environ.get("MEDSFT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "medsft"


def shared_data_dir() -> Path:
    """`$MEDSFT_SHARED_DATA`, else the `shared/data` folder beside the project."""
    env = os.environ.get(SHARED_DATA_ENV)
    return Path(env).expanduser() if env else REPO_ROOT.parent / "shared" / "data"


def in_project(path: str | os.PathLike) -> Path:
    """A relative path as given when it exists from the cwd, else relative to the project (bundled files)."""
    p = Path(os.path.expanduser(str(path)))
    if p.exists() or p.is_absolute():
        return p
    alt = REPO_ROOT / p
    return alt if alt.exists() else p
