"""What a local model folder must hold, checked without loading it, and whether a weight file is whole.

`model_dir_problems(folder)` names what is missing or damaged: no config.json, no tokenizer, no weights, a
safetensors file shorter than its header says (a truncated copy or download), a shard an index names that is
absent, a torch archive (pytorch_model.bin, optimizer.bin) whose zip directory is gone. `weight_file_problem`
is shared with the checkpoint verification (medsft.train.integrity).
"""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path
from typing import Optional

CONFIG_FILE = "config.json"
# One of these (sets) makes a tokenizer AutoTokenizer can load.
TOKENIZER_FILE_SETS = (
    ("tokenizer.json",), ("tokenizer.model",), ("vocab.json", "merges.txt"), ("spiece.model",), ("vocab.txt",),
    ("tiktoken.model",), ("qwen.tiktoken",),
)
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_INDEX = "pytorch_model.bin.index.json"
_SINGLE_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "consolidated.safetensors")
# A peft adapter folder (a LoRA checkpoint): its config and weights stand in for the model's (its base model,
# named in adapter_config.json, is checked when it is loaded).
ADAPTER_CONFIG = "adapter_config.json"
_ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_HEADER_MAX = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n} bytes"


def safetensors_problem(path: Path) -> Optional[str]:
    """None when the file's size is what its header describes; else what is wrong (read: the header only)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                return f"{path.name} is truncated ({_mb(size)}: not even a safetensors header)"
            (length,) = struct.unpack("<Q", head)
            if length > _HEADER_MAX or 8 + length > size:
                return f"{path.name} is truncated or not a safetensors file ({_mb(size)}; its header alone claims " \
                       f"{_mb(8 + length)})"
            header = json.loads(handle.read(length).decode("utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as err:
        return f"{path.name} cannot be read as safetensors ({type(err).__name__}: {err})"
    end = max((int(v["data_offsets"][1]) for k, v in header.items()
               if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v), default=0)
    expected = 8 + length + end
    if size < expected:
        return f"{path.name} is truncated ({_mb(size)} of the {_mb(expected)} its header describes)"
    if size > expected:
        return f"{path.name} is damaged ({_mb(size)}, its header describes {_mb(expected)})"
    return None


def torch_archive_problem(path: Path) -> Optional[str]:
    """None when a torch.save file (a zip archive since torch 1.6) has its directory; else what is wrong."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            archive.infolist()
    except (OSError, zipfile.BadZipFile, EOFError, ValueError) as err:
        try:
            size = _mb(path.stat().st_size)
        except OSError:
            size = "unreadable"
        return f"{path.name} is truncated or damaged ({size}; {type(err).__name__}: {err})"
    return None


def weight_file_problem(path: Path) -> Optional[str]:
    """What is wrong with a weight or state file, judged by its format (safetensors, torch archive), else None."""
    name = Path(path).name
    if name.endswith(".safetensors"):
        return safetensors_problem(path)
    if name.endswith((".bin", ".pt", ".pth", ".pkl")):
        try:
            with Path(path).open("rb") as handle:
                magic = handle.read(4)
        except OSError as err:
            return f"{name} cannot be read ({err.strerror})"
        if not magic:
            return f"{name} is empty"
        # torch.save writes a zip archive (its directory is at the end: a cut file has none); an old-style pickle
        # offers nothing cheap to check.
        return torch_archive_problem(path) if magic == b"PK\x03\x04" else None
    return None


def _index_problems(folder: Path, index_name: str) -> list[str]:
    try:
        weight_map = json.loads((folder / index_name).read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return [f"{index_name} cannot be read ({type(err).__name__}: {err})"]
    problems = []
    for shard in sorted(set(weight_map.values())):
        if not (folder / shard).is_file():
            problems.append(f"{shard} (named by {index_name}) is missing")
        elif (problem := weight_file_problem(folder / shard)) is not None:
            problems.append(problem)
    return problems


def weights_problems(folder: Path) -> list[str]:
    """Problems of a model folder's weights (none present counts as one); an adapter folder's adapter weights."""
    folder = Path(folder)
    if (folder / ADAPTER_CONFIG).is_file():
        present = [folder / name for name in _ADAPTER_WEIGHTS if (folder / name).is_file()]
        if not present:
            return [f"an adapter folder ({ADAPTER_CONFIG}) without its weights ({' or '.join(_ADAPTER_WEIGHTS)})"]
        return [p for p in (weight_file_problem(path) for path in present[:1]) if p]
    for index in (SAFETENSORS_INDEX, TORCH_INDEX):
        if (folder / index).is_file():
            return _index_problems(folder, index)
    present = [folder / name for name in _SINGLE_WEIGHTS if (folder / name).is_file()]
    if not present:
        return ["no weights (model.safetensors, sharded model-0000x-of-0000y.safetensors with "
                f"{SAFETENSORS_INDEX}, or pytorch_model.bin)"]
    return [p for p in (weight_file_problem(path) for path in present[:1]) if p]


def model_dir_problems(folder: Path, weights: bool = True, tokenizer: bool = True, config: bool = True) -> list[str]:
    """What a model folder lacks for training / evaluation (empty when it looks complete); `config`, `tokenizer`,
    `weights`: which parts to check (a tokenizer alone loads without config.json)."""
    folder = Path(folder)
    problems = []
    if (folder / ADAPTER_CONFIG).is_file():  # an adapter: no config.json of its own, the tokenizer may be the base's
        config = tokenizer = False
    if config and not (folder / CONFIG_FILE).is_file():
        problems.append(f"no {CONFIG_FILE} (a Hugging Face model folder starts with one)")
    if tokenizer and not any(all((folder / f).is_file() for f in files) for files in TOKENIZER_FILE_SETS):
        problems.append("no tokenizer (tokenizer.json, tokenizer.model, or vocab.json + merges.txt)")
    if weights:
        problems += weights_problems(folder)
    return problems
