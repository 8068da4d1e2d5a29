"""What makes a checkpoint safe to write and safe to use (checkpoint.py and resume.py call these).

Before writing (collective: every process takes part and all reach the same decision):
- the weights are finite: a checkpoint of NaN/inf weights is never written, marked or kept (TrainingDiverged);
- the disk has room: about the size of the previous checkpoint (or, for the first, twice the weights plus the
  optimizer state) must be free, else "no space left on <path>: need ~N MB, M free" and nothing is written.

While writing: a failure (a disk that fills anyway, a quota) removes the partial temporary folder; a full disk
is reported as above; the previous checkpoint is untouched (rotation runs only after a complete save).

At write time `MANIFEST.json` records every file's size and SHA-256 (of the whole file up to 64 MiB; of its
size, first and last MiB above that: hashing a 100 GB optimizer state at every save and resume would cost
minutes). Before use, `checkpoint_problems` compares the folder with it and checks the formats it can check
cheaply (a safetensors file against its header, a torch archive's zip directory), also in checkpoints written
before manifests existed; resume falls back to the newest intact checkpoint and sets damaged ones aside.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Iterable, Optional

import torch

from medsft.errors import OutputError, TrainingDiverged
from medsft.models.files import weight_file_problem, weights_problems

log = logging.getLogger("medsft.checkpoint")

MANIFEST_FILE = "MANIFEST.json"
FULL_HASH_MAX = 64 * 2**20
EDGE = 2**20
_MB = 1e6
_MARGIN = 16 * 2**20  # tokenizer, RNG states, configs, and room for the file system's own bookkeeping
_DISK_FULL_WORDS = ("no space left", "storagefull", "os error 28", "quota exceeded", "disk quota")
_WRITE_FAILED_WORDS = ("iostream error", "file write failed", "pytorchstreamwriter failed", "failed to write",
                       "inline_container", "ioerror")
DAMAGED_SUFFIX = ".damaged"


# ----------------------------------------------------------------------------------------------- collectives


def any_process(accelerator, flag: bool) -> bool:
    """True on every process when `flag` is True on any (collective when there are several)."""
    if accelerator.num_processes == 1:
        return bool(flag)
    tensor = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(tensor, reduction="sum").item() > 0)


def sum_processes(accelerator, value: float) -> float:
    if accelerator.num_processes == 1:
        return float(value)
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=accelerator.device)
    return float(accelerator.reduce(tensor, reduction="sum").item())


# ----------------------------------------------------------------------------------------------- finite weights


def non_finite_tensors(state_dict: dict, limit: int = 3) -> list[str]:
    """Names of (up to `limit`) floating-point tensors holding a NaN or an inf."""
    bad = []
    for name, tensor in state_dict.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and tensor.numel():
            if not bool(torch.isfinite(tensor).all()):
                bad.append(name)
                if len(bad) >= limit:
                    break
    return bad


def refuse_non_finite(accelerator, state_dict: dict, step: int, root: Path, latest: Optional[Path], lr) -> None:
    """Collective: raise TrainingDiverged on every process when the main process's weights are not finite."""
    bad = non_finite_tensors(state_dict) if accelerator.is_main_process else []
    if any_process(accelerator, bool(bad)):
        where = f" (in {', '.join(bad)}{', ...' if len(bad) >= 3 else ''})" if bad else ""
        raise TrainingDiverged(
            f"the model's weights at step {step} are not finite{where}: no checkpoint was written for it; "
            f"{f'the last good checkpoint {latest} is kept' if latest else 'no earlier checkpoint exists'} in {root}. "
            f"A learning rate far too high (optimizer.learning_rate={lr}) or an fp16 overflow are the usual causes"
        )


# ----------------------------------------------------------------------------------------------- disk space


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def _tensor_bytes(tensors: Iterable) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def estimate_bytes(accelerator, state_dict: dict, optimizer, previous: Optional[Path]) -> int:
    """Collective. Bytes this checkpoint will take: the previous one's size, else twice the weights (the
    Hugging Face export and the training state's copy) plus the optimizer state of every process."""
    local = 0.0
    if previous is not None and accelerator.is_main_process:
        try:
            local = float(folder_bytes(previous))
        except OSError:
            local = 0.0
    if not local:
        inner = getattr(optimizer, "optimizer", optimizer)
        try:
            local = float(sum(_tensor_bytes(state.values()) for state in getattr(inner, "state", {}).values()))
        except (AttributeError, TypeError, RuntimeError):
            local = 0.0
        if accelerator.is_main_process:
            local += 2 * _tensor_bytes(state_dict.values())
    return int(sum_processes(accelerator, local)) + _MARGIN


def free_bytes(path: Path) -> int:
    path = Path(path)
    for parent in [path, *path.parents]:
        if parent.exists():
            return shutil.disk_usage(parent).free
    return 0


def no_space_message(root: Path, need: int, latest: Optional[Path], removed: Optional[str] = None) -> str:
    return (f"no space left on {root}: need ~{math.ceil(need / _MB)} MB, {free_bytes(root) // int(_MB)} MB free"
            + (f"; the partial checkpoint {removed} was removed" if removed else "; nothing was written")
            + (f"; the previous checkpoint {latest.name} is kept" if latest else "")
            + ". Free some space there, lower checkpoint.max_ckpts, or point output_dir at a larger disk")


def ensure_free_space(accelerator, root: Path, need: int, latest: Optional[Path]) -> None:
    """Collective: OutputError on every process when any process sees less than `need` bytes free at root."""
    short = free_bytes(root) < need
    if any_process(accelerator, short):
        raise OutputError(no_space_message(root, need, latest))


def is_disk_full(err: BaseException, root: Path, need: int) -> bool:
    """Whether a write failure is a full disk or quota: by errno, by the words libraries use (safetensors,
    torch's `basic_ios::clear: iostream error`), or by the free space left now."""
    seen, current = 0, err
    while current is not None and seen < 10:
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(current).lower()
        if any(word in text for word in _DISK_FULL_WORDS):
            return True
        if any(word in text for word in _WRITE_FAILED_WORDS) and free_bytes(root) < max(need // 10, 64 * 2**20):
            return True
        current = current.__cause__ or current.__context__
        seen += 1
    return False


# ----------------------------------------------------------------------------------------------- manifest


def _digest(path: Path, size: int) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as handle:
        if size <= FULL_HASH_MAX:
            for block in iter(lambda: handle.read(4 * EDGE), b""):
                sha.update(block)
            return "sha256:" + sha.hexdigest()
        sha.update(str(size).encode())
        sha.update(handle.read(EDGE))
        handle.seek(size - EDGE)
        sha.update(handle.read(EDGE))
        return "sha256-edges:" + sha.hexdigest()


def write_manifest(folder: Path, skip: Iterable[str] = ()) -> Path:
    """Record every file's size and checksum (see the module doc) in `folder/MANIFEST.json`."""
    folder = Path(folder)
    skipped = {MANIFEST_FILE, *skip}
    files = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and rel not in skipped:
            size = path.stat().st_size
            files[rel] = {"size": size, "digest": _digest(path, size)}
    manifest = folder / MANIFEST_FILE
    manifest.write_text(json.dumps({"version": 1, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": files},
                                   indent=1) + "\n", encoding="utf-8")
    return manifest


def manifest_problems(folder: Path) -> list[str]:
    manifest = Path(folder) / MANIFEST_FILE
    if not manifest.is_file():
        return []  # written before manifests existed: the structural checks still apply
    try:
        files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return [f"{MANIFEST_FILE} cannot be read ({type(err).__name__})"]
    problems = []
    for rel, entry in files.items():
        path = Path(folder) / rel
        if not path.is_file():
            problems.append(f"{rel} is missing")
            continue
        size = path.stat().st_size
        if size != entry.get("size"):
            problems.append(f"{rel} is {size} bytes, {entry.get('size')} when it was written")
        elif entry.get("digest") and _digest(path, size) != entry["digest"]:
            problems.append(f"{rel} changed since it was written (checksum)")
    return problems


def checkpoint_problems(folder: Path, state_file: str, training_state_dir: str) -> list[str]:
    """What makes a checkpoint folder unusable (empty when it is intact)."""
    folder = Path(folder)
    problems = manifest_problems(folder)
    if not problems:
        try:
            state = json.loads((folder / state_file).read_text(encoding="utf-8"))
            if not isinstance(state, dict) or "global_step" not in state:
                problems.append(f"{state_file} holds no global_step")
        except FileNotFoundError:
            problems.append(f"{state_file} is missing")
        except (OSError, ValueError) as err:
            problems.append(f"{state_file} cannot be read ({type(err).__name__}: {err})")
        problems += weights_problems(folder)
        state_dir = folder / training_state_dir
        if not state_dir.is_dir():
            problems.append(f"{training_state_dir}/ is missing")
        else:
            for path in sorted(state_dir.rglob("*")):
                problem = weight_file_problem(path) if path.is_file() else None
                if problem:
                    problems.append(f"{training_state_dir}/{path.relative_to(state_dir).parent.as_posix()}/"
                                    .replace("/./", "/") + problem)
    return problems


def set_aside(path: Path) -> Path:
    """Rename a damaged checkpoint so nothing counts it any more (kept for inspection; delete it at will)."""
    path = Path(path)
    target = path.with_name(f"{path.name}{DAMAGED_SUFFIX}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}{DAMAGED_SUFFIX}-{n}")
    path.rename(target)
    return target
