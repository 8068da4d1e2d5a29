"""The places a run writes to, claimed before anything heavy starts: `output_dir` (and the experiment folder
`{output_dir}/{experiment_name}` under it), `log_dir` when wandb writes there, and the run folder are checked to
be writable directories, and the experiment folder is locked for the run's life (medsft.runtime.lock), so a
problem with them fails at start-up, not after the last training step, and one run owns an experiment folder.

Which process holds the lock: exactly one per run. A plain `python launch.py` (which may re-invoke itself as
a distributed job: its workers inherit the lock) on machine 0; under a launcher of the user's own
(accelerate launch, torchrun, one srun task per process), the process of global rank 0. A worker re-invoked by
medsft, and every process on machines other than 0, checks the places but takes no lock.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator, Mapping, Optional

from omegaconf import DictConfig

from medsft.errors import OutputError
from medsft.runtime.cluster import LAUNCH_DIR_ENV, inside_launcher, slurm_task_per_process, this_machine_rank
from medsft.runtime.lock import FolderLock


def experiment_dir(cfg: DictConfig) -> Path:
    """`{output_dir}/{experiment_name}`: the run's checkpoints (SFT directly, RL under rl_<algorithm>/)."""
    return Path(cfg.output_dir).expanduser().resolve() / str(cfg.experiment_name)


def check_writable_dir(path: Path, key: str) -> None:
    """Create `path` if needed and write a probe file into it; OutputError names the key and what is wrong."""
    path = Path(path).expanduser()
    for parent in [path, *path.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(f"{key}: {parent} is a file, not a directory; point {key} at a directory")
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".medsft-write-probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OutputError(f"{key}: {path} is not a writable directory ({err.strerror}); point {key} elsewhere or "
                          "fix its permissions") from err


def wandb_writes_logs(cfg: DictConfig) -> bool:
    return cfg.logging.backend == "wandb" and cfg.logging.wandb_mode != "disabled"


def _places(cfg: DictConfig, run_dir: Optional[Path]) -> list[tuple[Path, str]]:
    places = [(experiment_dir(cfg), "output_dir/experiment_name")]
    if wandb_writes_logs(cfg):
        places.append((Path(cfg.log_dir).expanduser().resolve() / str(cfg.experiment_name), "log_dir"))
    if run_dir is not None:
        places.append((Path(run_dir).resolve(), "the run folder (hydra.run.dir)"))
    return places


def _missing(path: Path) -> list[Path]:
    """`path` and its ancestors that do not exist yet, deepest first."""
    missing = []
    for candidate in [path, *path.parents]:
        if candidate.exists():
            break
        missing.append(candidate)
    return missing


def check_output_locations(cfg: DictConfig, run_dir: Optional[Path]) -> list[Path]:
    """Every place the run writes to is a writable directory (created when missing); returns the folders it
    created, deepest first."""
    created: list[Path] = []
    for path, key in _places(cfg, run_dir):
        missing = _missing(path)
        check_writable_dir(path, key)
        created += missing
    return created


def _remove_if_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first: a run that failed before writing anything leaves no empty folders
        try:
            folder.rmdir()
        except OSError:
            pass


def holds_experiment_lock(cfg: DictConfig, environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this process is the one of its run that locks the experiment folder (see the module doc)."""
    if environ.get(LAUNCH_DIR_ENV):
        return False  # re-invoked by medsft: the launching process holds the lock
    if inside_launcher(environ):
        return environ.get("RANK", "0") in ("", "0")
    if slurm_task_per_process(cfg, environ):
        return environ.get("SLURM_PROCID") == "0"
    return this_machine_rank(cfg, environ) == 0


@contextlib.contextmanager
def claim_outputs(cfg: DictConfig, run_dir: Optional[Path]) -> Iterator[None]:
    """Check the output locations, then hold the experiment folder's lock (one process per run) for the block."""
    created = check_output_locations(cfg, run_dir)
    try:
        if not holds_experiment_lock(cfg):
            yield
            return
        hint = (f", or give this one its own experiment_name=... (now {cfg.experiment_name}) or output_dir=... "
                f"(now {cfg.output_dir})")
        with FolderLock(experiment_dir(cfg), what="experiment folder", run_dir=run_dir, hint=hint):
            yield
    finally:
        _remove_if_empty(created)
