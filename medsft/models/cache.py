"""The local models cache: its location, and building a model directory once, atomically, under a file lock.

`<models>` is `model.cache_dir` when set, else `$MEDSFT_CACHE/models` (or `~/.cache/medsft/models`). Prepared
directories appear atomically: they are built in a temporary sibling, completed by a marker file, then renamed
into place under a file lock, so concurrent processes (several ranks, parallel tests) build once.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from medsft.paths import cache_home

try:  # POSIX only; used to report peak memory of the SmolLM2 preparation
    import resource
except ImportError:  # pragma: no cover - Windows
    resource = None
try:  # POSIX; elsewhere concurrent builders fall back to build-then-rename (the loser discards its copy).
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

MARKER_NAME = ".medsft-complete.json"


def models_dir(cache_dir: str | os.PathLike | None) -> Path:
    """The models directory: `cache_dir` (what `model.cache_dir` names) when given, else the default."""
    return Path(cache_dir).expanduser() if cache_dir else cache_home() / "models"


def is_complete(directory: Path) -> bool:
    return (directory / MARKER_NAME).is_file()


@contextlib.contextmanager
def _file_lock(lock_path: Path) -> Iterator[bool]:
    """Exclusive lock held for the block; yields whether a real lock is held (False where fcntl is missing)."""
    if fcntl is None:  # pragma: no cover - Windows
        yield False
        return
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_once(final_dir: Path, build: Callable[[Path], dict]) -> Path:
    """Return `final_dir`, running `build(tmp_dir) -> marker info` first unless a complete copy exists.

    The build writes into a temporary sibling (same filesystem, so the rename is atomic); the marker is written
    last; then the directory is renamed into place. Other processes wait on the lock and then find it complete.
    """
    if is_complete(final_dir):
        return final_dir
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(final_dir.parent / f".{final_dir.name}.lock") as locked:
        if is_complete(final_dir):  # another process finished while we waited
            return final_dir
        if locked:  # nobody else is building this name now: leftovers are from killed builders
            for stale in final_dir.parent.glob(f".{final_dir.name}.tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.tmp-", dir=final_dir.parent))
        try:
            info = build(tmp_dir)
            (tmp_dir / MARKER_NAME).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
            _apply_umask(tmp_dir)
            if is_complete(final_dir):  # only without a lock: another builder won the race; discard our copy
                return final_dir
            if final_dir.exists():  # an incomplete directory without marker (not ours): replace it
                shutil.rmtree(final_dir)
            try:
                os.replace(tmp_dir, final_dir)
            except OSError:
                if not is_complete(final_dir):  # lost a lock-free race only if the winner's copy is complete
                    raise
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return final_dir


def _current_umask() -> int:
    try:  # Linux exposes it without the set-and-restore race of os.umask
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"^Umask:\s*([0-7]+)", status, re.M).group(1), 8)
    except (OSError, AttributeError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def _apply_umask(root: Path) -> None:
    """mkdtemp (and safetensors) create owner-only modes; give the cache the modes a plain mkdir would."""
    mask = _current_umask()
    for path in [root, *root.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 if resource else 0.0  # KiB on Linux
