"""Default experiment names that say what a run trains: `${medsft_name:local_test}` in a preset composes to
`local_test_<model>_<data>`, so runs of one preset on other models or data get checkpoint folders of their own
(`{output_dir}/{experiment_name}`) instead of meeting another run's checkpoints there.

`<model>` is the last part of `model.path` (`meta-llama/Llama-3.2-1B-Instruct` -> `Llama-3.2-1B-Instruct`,
`embedded:smollm2-135m-instruct` -> `smollm2-135m-instruct`, `tiny-random:llama` -> `tiny-random-llama`, a local
folder -> its name), `<data>` the stem of
`data.path` (`data/demo_data.json` -> `demo_data`), or for a `data.mixture` the data group's name and a short
hash of its sources (`demo_es_en-1a2b3c`: two mixtures never share a folder); an unset value is left out.
`experiment_name=...` on the command line names a run exactly.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from omegaconf import OmegaConf

RESOLVER = "medsft_name"
_DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".arrow", ".gz")


def slug(value: Any, data_file: bool = False) -> str:
    """The last part of a path, Hub id or `scheme:name` source, as folder-name-safe text ('' when unset)."""
    text = str(value or "").strip().rstrip("/\\")
    if not text or text == "???":
        return ""
    last = re.split(r"[/\\]", text)[-1]
    if ":" in last:  # a medsft source: tiny-random:llama -> tiny-random-llama; the default embedded model by name
        scheme, _, name = last.partition(":")
        last = name if scheme == "embedded" else f"{scheme}-{name}"
    while data_file and last.lower().endswith(_DATA_SUFFIXES) and "." in last[1:]:  # train.jsonl.gz -> train
        last = last.rsplit(".", 1)[0]
    return re.sub(r"[^A-Za-z0-9._-]+", "-", last).strip("-.")


def experiment_name(prefix: str, root: Any) -> str:
    """`<prefix>_<model>_<data>` for the composed config `root` (see the module doc)."""
    model = slug(OmegaConf.select(root, "model.path", throw_on_missing=False))
    data = slug(OmegaConf.select(root, "data.path", throw_on_missing=False), data_file=True)
    mixture = OmegaConf.select(root, "data.mixture", throw_on_missing=False)
    if not data and mixture:
        sources = json.dumps(OmegaConf.to_container(mixture, resolve=True), sort_keys=True, default=str)
        name = slug(OmegaConf.select(root, "data.name", throw_on_missing=False)) or "mixture"
        data = f"{name}-{hashlib.blake2b(sources.encode(), digest_size=3).hexdigest()}"
    return "_".join(part for part in (str(prefix), model, data) if part)


def register_resolvers() -> None:
    """`${medsft_name:<prefix>}` for conf/experiment presets."""
    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, lambda prefix, _root_: experiment_name(prefix, _root_))
