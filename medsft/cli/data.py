"""`medsft data check|stats|sample|show`: look at data before training on it.

  medsft data check SOURCE [--format F] [--fields-preset es|huatuo_en]   validation; exit 0 valid, 1 not
  medsft data stats SOURCE [overrides] [--model M]                token lengths, share over max_seq_len, and the
                                                                   optimizer steps of the run these overrides compose
  medsft data sample SOURCE --n 10 --out FILE [--seed S]          a seeded random subset, records unchanged
  medsft data show SOURCE --index I --model M                     the training text, loss-carrying part marked

SOURCE is a data file (.json / .jsonl / .parquet / .arrow), a `save_to_disk` or data-file folder, a Hub dataset
id, and/or the Hydra overrides of the `data` group a run would get (`data=demo_es_en`, `data=mixture
'data.mixture=[{path: a.json, weight: 0.7}, {path: b.jsonl, format: huatuo, weight: 0.3}]'`, `data.format=
messages`): every source of a mixture is checked (stats: and mixed as training would); `--source NAME` picks one
for show and sample. Record formats (--format): auto (detected), medsft, huatuo, messages, sharegpt, alpaca; the
file type (--file-type) is detected from the extension unless given.

`stats` composes the config `python launch.py <overrides> data.path=SOURCE` would train with (the demo preset
unless experiment= is given) and reports its numbers: max_seq_len, the validation split, batch, accumulation,
processes and epochs all come from that config (--max-seq-len, --bsz, --accum, --world, --epochs override them).
--model takes what model.path takes: a local directory, `tiny-random:llama`, `embedded:smollm2-135m-instruct`
or a Hub id (resolved and loaded exactly as training loads it); without it (stats), the composed config's model.
Field presets are the files of conf/data/ (`es` = the Spanish default schema). Exit codes: 0 ok, 1 bad data /
path / model / config, 2 bad usage (argparse).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from medsft.cli.usage import CommandParser, examples_block
from medsft.config import compose, unknown_override_keys
from medsft.config.presets import describe_experiment, experiment_of
from medsft.config.data import FILE_TYPES, RECORD_FORMATS
from medsft.config.validation import validate
from medsft.data.dataset import build_sft_data, cache_root, example_stats, open_scanned, select_examples, tokenize_scan, \
    tokenizer_fingerprint
from medsft.data.formats import FILE_TYPE_VALUES
from medsft.data.mixture import SourceConfig, draw_counts, source_configs
from medsft.data.render import apply_length_policy, ensure_chat_template, render_records
from medsft.data.tokenize import char_bound
from medsft.errors import ConfigError, DataError, MedsftError
from medsft.paths import CONF_DIR

log = logging.getLogger("medsft.data")


# --------------------------------------------------------------------------------------------------- helpers


def presets() -> list[str]:
    names = {"es"}
    names.update(p.stem for p in (CONF_DIR / "data").glob("*.yaml") if p.stem != "base")
    return sorted(names)


def _production_config(*overrides: str) -> DictConfig:
    """The config a run composes to without an experiment preset: conf/'s defaults (the seed's values)."""
    try:
        return compose(["~experiment", *overrides])
    except MedsftError:
        raise
    except Exception as err:  # Hydra's composition errors: a bad override
        raise ConfigError(f"cannot compose the config with {list(overrides)}: {err}") from None


def fields_for(preset: Optional[str]) -> DictConfig:
    """The field map of a conf/data preset (`es`: the Spanish default schema of conf/data/base.yaml)."""
    if preset in (None, "", "es"):
        return _production_config().data.fields
    if preset not in presets():
        raise DataError(f"--fields-preset {preset!r}: no such preset (available: {', '.join(presets())})")
    return _production_config(f"data={preset}").data.fields


def _split_targets(targets: Sequence[str]) -> tuple[Optional[str], list[str]]:
    """(the path, the Hydra overrides) of the positional arguments: an argument with '=' is an override."""
    paths = [t for t in targets if not t.startswith("~") and ("=" not in t or os.path.exists(t))]
    overrides = [t for t in targets if t not in paths]
    if len(paths) > 1:
        raise ConfigError(f"give one data path (got {paths}); several sources go in data.mixture")
    return (paths[0] if paths else None), overrides


def _data_cfg(args: argparse.Namespace) -> DictConfig:
    """The `data` node training would use, with this command's source, overrides, field preset and options."""
    path, overrides = _split_targets(args.targets)
    cfg = _production_config(*overrides)
    data = cfg.data
    if path is not None:
        data.path = path
        data.mixture = []
    if getattr(args, "fields_preset", None):
        data.fields = fields_for(args.fields_preset)
    for key in ("format", "file_type", "split", "subset", "revision", "on_invalid", "max_seq_len", "overlong",
                "system_prompt", "response_template", "headers_in_text", "loss_turns", "num_proc"):
        value = getattr(args, key, None)
        if value is not None:
            setattr(data, key, value)
    validate(cfg)
    return data


# `medsft data stats` options that set a key of the composed config (None: the config's value).
_STATS_OPTIONS = {
    "max_seq_len": "data.max_seq_len",
    "overlong": "data.overlong",
    "on_invalid": "data.on_invalid",
    "format": "data.format",
    "file_type": "data.file_type",
    "split": "data.split",
    "subset": "data.subset",
    "revision": "data.revision",
    "headers_in_text": "data.headers_in_text",
    "loss_turns": "data.loss_turns",
    "num_proc": "data.num_proc",
    "system_prompt": "data.system_prompt",
    "response_template": "data.response_template",
    "bsz": "train.train_bsz_per_gpu",
    "accum": "train.gradient_accumulation_steps",
    "epochs": "train.n_epochs",
    "world": "launcher.num_processes",
}


def run_config(args: argparse.Namespace) -> tuple[DictConfig, list[str]]:
    """The training config `python launch.py <overrides> data.path=SOURCE` composes (with `--fields-preset` as
    `data=<preset>` and the options above set on it), validated; and the overrides it was composed from."""
    path, overrides = _split_targets(args.targets)
    given = list(overrides)
    problems = unknown_override_keys(overrides)
    if problems:
        raise DataError("; ".join(problems))
    preset = getattr(args, "fields_preset", None)
    if preset not in (None, "", "es"):
        fields_for(preset)  # an unknown preset: a clear error naming the available ones
        overrides.insert(0, f"data={preset}")
    try:
        cfg = compose(overrides)
    except (HydraException, OmegaConfBaseException) as err:
        raise DataError(f"cannot compose the config from {' '.join(overrides)!r}: {err}") from None
    if path is not None:
        cfg.data.path = path
        cfg.data.mixture = []
    if getattr(args, "model", None):
        cfg.model.path = args.model
    for option, key in _STATS_OPTIONS.items():
        value = getattr(args, option, None)
        if value is not None:
            node, leaf = key.rsplit(".", 1)
            setattr(cfg[node], leaf, value)
    validate(cfg)
    return cfg, given


def _sources(data: DictConfig, pick: Optional[str] = None) -> list[SourceConfig]:
    sources = source_configs(data, str(cache_root(data) / "hf"))
    if pick is not None:
        chosen = [s for s in sources if s.name == pick]
        if not chosen:
            raise DataError(f"--source {pick!r}: no such source (sources: {', '.join(s.name for s in sources)})")
        return chosen
    return sources


def _one_source(data: DictConfig, pick: Optional[str], command: str) -> SourceConfig:
    sources = _sources(data, pick)
    if len(sources) > 1:
        raise DataError(f"`medsft data {command}` works on one source: pick one with --source "
                        f"({', '.join(s.name for s in sources)})")
    return sources[0]


def _load_tokenizer(model: str | DictConfig) -> Any:
    """The tokenizer training would use for model.path=`model` (or a composed `model` node), with its pad token
    and chat template."""
    from medsft.models import load_tokenizer  # torch + transformers (~4 s): only the commands that tokenize

    if isinstance(model, DictConfig):
        model_cfg = model
    else:
        model_cfg = _production_config().model
        model_cfg.path = model
    tok = load_tokenizer(model_cfg)
    ensure_chat_template(tok)
    return tok


@contextlib.contextmanager
def _quiet(*names: str):
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _percentiles(values: Sequence[int]) -> dict:
    if not len(values):
        return {}
    s = np.sort(np.asarray(values))

    def q(p: float) -> int:
        return int(s[min(len(s) - 1, int(round(p * (len(s) - 1))))])

    return {"min": int(s[0]), "p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": int(s[-1]),
            "mean": round(statistics.fmean(s.tolist()), 1)}


def _record_format(value: str) -> str:
    if value in FILE_TYPE_VALUES:
        raise argparse.ArgumentTypeError(f"{value!r} is a file type: --format names the record format "
                                         f"({', '.join(RECORD_FORMATS)}); use --file-type {value}")
    if value not in RECORD_FORMATS:
        raise argparse.ArgumentTypeError(f"{value!r} is not one of {', '.join(RECORD_FORMATS)}")
    return value


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("targets", nargs="+", metavar="SOURCE",
                   help="a data file / folder / Hub id, and/or Hydra overrides of the data group (data=..., "
                        "data.mixture=[...], data.format=...)")
    p.add_argument("--fields-preset", default=None, metavar="NAME",
                   help="field mapping: es (default: Pregunta/Razonamiento_Complejo/Respuesta) or huatuo_en "
                        "(Question/Complex_CoT/Response), i.e. a conf/data/<NAME>.yaml")
    p.add_argument("--format", default=None, type=_record_format, metavar="FORMAT",
                   help=f"record format: {' | '.join(RECORD_FORMATS)} (data.format)")
    p.add_argument("--file-type", default=None, choices=list(FILE_TYPES), help="file type (data.file_type)")
    p.add_argument("--split", default=None, help="split of a folder / Hub dataset (data.split)")
    p.add_argument("--subset", default=None, help="Hub dataset configuration (data.subset)")
    p.add_argument("--revision", default=None, help="Hub dataset revision (data.revision)")
    p.add_argument("--headers-in-text", default=None, choices=["warn", "skip", "error"],
                   help="records whose text holds the layout's headers (data.headers_in_text)")


def _add_render(p: argparse.ArgumentParser, model_required: bool = True) -> None:
    p.add_argument("--model", required=model_required, default=None,
                   help="model.path: directory, tiny-random:llama, embedded:..., hub id"
                        + ("" if model_required else " (default: the composed config's model)"))
    p.add_argument("--system-prompt", default=None)
    p.add_argument("--response-template", default=None, help="default: the HuatuoGPT-o1 layout")
    p.add_argument("--loss-turns", default=None, choices=["all", "last"], help="data.loss_turns")


# -------------------------------------------------------------------------------------------------- commands


def cmd_check(args: argparse.Namespace) -> int:
    data = _data_cfg(args)
    data.on_invalid = "skip"  # report every invalid record, then fail
    failed = False
    for sc in _sources(data):
        with _quiet("medsft.data.records", "medsft.data.dataset"):  # we print the report ourselves
            try:
                result = open_scanned(sc, data)
            except DataError as err:
                print(f"INVALID: {err}", file=sys.stderr)
                failed = True
                continue
        report = result.report
        label = f"[{sc.name}] " if len(data.mixture or []) else ""
        if report.n_invalid:
            shown = report.invalid[: args.max_errors]
            print(f"{label}{report.path}: {report.n_invalid} of {report.total} records invalid:", file=sys.stderr)
            for msg in shown:
                print(f"  {msg}", file=sys.stderr)
            if report.n_invalid > len(shown):
                print(f"  ... and {report.n_invalid - len(shown)} more", file=sys.stderr)
            print(f"INVALID: {label}{report.summary()}", file=sys.stderr)
            failed = True
            continue
        if report.header_clashes:
            print(f"{label}{report.path}: {report.header_clashes} records hold the layout's headers in their text "
                  f"(data.headers_in_text={data.headers_in_text}):", file=sys.stderr)
            for msg in result.clashes[: args.max_errors]:
                print(f"  {msg}", file=sys.stderr)
        print(f"OK: {label}{report.summary()}")
    return 1 if failed else 0


def _source_stats(sc: SourceConfig, data: DictConfig, tok: Any, use_cache: bool) -> tuple[dict, Any, Any]:
    """Token figures of one source, every valid record tokenized as training would (with its cache)."""
    result = open_scanned(sc, data)
    report = result.report
    positions = np.arange(len(result))
    max_len = int(data.max_seq_len)
    bound = char_bound(tok, max_len)
    tokenized = tokenize_scan(tok, sc, data, result, positions, use_cache, None, bound, tokenizer_fingerprint(tok))
    store = tokenized.store
    last_start, last_end = store.last_spans()
    first_start = store.first_starts()
    lengths = store.lengths()
    spans = store.spans.astype(np.int64)  # every row has at least one span: reduceat sums each row's
    per_row_loss = np.add.reduceat(spans[:, 1] - spans[:, 0], store.span_offsets[:-1]) if len(spans) else spans[:0, 0]
    n_over_bound = len(tokenized.over)
    over = int((last_end > max_len).sum()) + n_over_bound
    prompt_over = int((first_start >= max_len).sum()) + int((result.prompt_chars[tokenized.over] > bound).sum()
                                                            if n_over_bound else 0)
    policy = "drop" if data.overlong == "error" else data.overlong
    counts: dict = {}
    with _quiet("medsft.data.dataset"):
        data.overlong = policy
        examples = select_examples(tokenized, positions, tok, data, counts, "")
    figures = example_stats(examples)
    n = len(positions)
    out = {
        "path": str(sc.spec.path), "name": sc.name, "format": report.record_format, "records": report.total,
        "valid": report.kept, "invalid": report.n_invalid, "duplicates": report.duplicates,
        "prompt_tokens": _percentiles(first_start), "response_tokens": _percentiles(per_row_loss),
        "total_tokens": _percentiles(lengths), "sum_tokens": int(lengths.sum()),
        "max_seq_len": max_len, "over_max_seq_len": over,
        "over_max_seq_len_share": round(over / n, 4) if n else 0.0, "prompt_alone_over": prompt_over,
        "over_char_bound": n_over_bound, "examples_after_policy": figures["examples"],
        "truncated": counts["truncated"], "trained_tokens": figures["tokens"], "loss_tokens": figures["loss_tokens"],
    }
    return out, report, examples


def cmd_stats(args: argparse.Namespace) -> int:
    cfg, overrides = run_config(args)
    data = cfg.data
    overlong = data.overlong
    sources = _sources(data)
    tok = _load_tokenizer(cfg.model)
    per_source = []
    for sc in sources:
        data.overlong = overlong
        per_source.append(_source_stats(sc, data, tok, not args.no_cache)[0])
    data.overlong = overlong
    counts = draw_counts(sources, [s["examples_after_policy"] for s in per_source])
    kept = sum(counts)
    if len(per_source) == 1:
        out = dict(per_source[0])
        out.pop("name")
        out.pop("format")
    else:
        out = {"sources": per_source, "mixture_examples": dict(zip((s.name for s in sources), counts))}
        for k in ("records", "valid", "invalid", "duplicates", "sum_tokens", "over_max_seq_len", "prompt_alone_over",
                  "truncated", "trained_tokens", "loss_tokens"):
            out[k] = sum(s[k] for s in per_source)
    preset, named = experiment_of(overrides)
    out.update({"model": cfg.model.path, "experiment": preset, "overlong_policy": overlong,
                "examples_after_policy": kept, "max_seq_len": int(data.max_seq_len)})
    out.update(_run_plan(cfg, tok, use_cache=not args.no_cache))
    if args.json:
        print(json.dumps(out, indent=2, ensure_ascii=False))
        return 0
    print(f"config: {describe_experiment(preset, named)}" + (f"; overrides: {' '.join(overrides)}" if overrides else ""))
    for s, k in zip(per_source, counts):
        _print_source(s, cfg.model.path, data, overlong, k if len(per_source) > 1 else None)
    if len(per_source) > 1:
        print("mixture: " + ", ".join(f"{sc.name} {k}" for sc, k in zip(sources, counts)) + f" = {kept} examples")
    if out.get("plan_error"):
        print(f"optimizer steps: none, the run would stop: {out['plan_error']}")
        return 0
    print(f"the run: {out['train_examples']} training examples"
          + (f" ({out['val_examples']} held out for validation)" if out["val_examples"] else "")
          + (f", packed into {out['packed_rows']} rows" if out.get("packed_rows") is not None else ""))
    capped = f", capped at train.max_steps={out['max_steps']}" if out["max_steps"] else ""
    print(f"optimizer steps: {out['steps_per_epoch']} per epoch x {out['epochs']} epochs = {out['total_steps']}"
          f"{capped} (global batch {out['global_batch']} = {out['bsz']} per device x {out['accum']} accumulation "
          f"x {out['world']} processes)")
    return 0


def _print_source(s: dict, model: str, data: DictConfig, overlong: str, drawn: Optional[int]) -> None:
    max_len = int(data.max_seq_len)
    head = f"[{s['name']}] " if drawn is not None else ""
    print(f"{head}{s['path']}: {s['records']} records ({s['format']}), {s['valid']} valid"
          + (f", {s['invalid']} invalid (skipped)" if s["invalid"] else "")
          + (f", {s['duplicates']} duplicates" if s["duplicates"] else ""))
    print(f"tokenizer: {model} (chat template rendering, as in training)")
    print(f"{'tokens':<22}{'min':>8}{'p50':>8}{'p90':>8}{'p99':>8}{'max':>8}{'mean':>10}")
    for label, key in (("prompt", "prompt_tokens"), ("response (+end turn)", "response_tokens"),
                       ("total", "total_tokens")):
        d = s[key]
        if d:
            print(f"{label:<22}{d['min']:>8}{d['p50']:>8}{d['p90']:>8}{d['p99']:>8}{d['max']:>8}{d['mean']:>10}")
    print(f"total tokens: {s['sum_tokens']:,}")
    n = s["valid"]
    print(f"over max_seq_len={max_len}: {s['over_max_seq_len']} of {n} ({100 * s['over_max_seq_len_share']:.1f}%)"
          + (f", {s['prompt_alone_over']} with the prompt alone over it (never trained)" if s["prompt_alone_over"]
             else "")
          + (f", {s['over_char_bound']} longer in characters than {max_len} tokens can be (not tokenized whole)"
             if s["over_char_bound"] else ""))
    if overlong == "error" and s["over_max_seq_len"]:
        print(f"with data.overlong=error: training stops with an error ({s['over_max_seq_len']} records over the "
              "limit); with drop:")
    print(f"with data.overlong={overlong}: {s['examples_after_policy']} examples ({s['truncated']} truncated), "
          f"{s['trained_tokens']:,} tokens, {s['loss_tokens']:,} carrying loss"
          + (f"; {drawn} drawn into the mixture" if drawn is not None else ""))


def _run_plan(cfg: DictConfig, tok: Any, use_cache: bool) -> dict:
    """The training split and the optimizer steps of the run `cfg` describes, computed by the loop's own code
    (medsft.data: the split, max_samples, the length policy, packing; StepPlan: the steps); or `plan_error`."""
    from medsft.data.order import DataOrder  # imports torch (~2 s): not for `medsft data check`

    t = cfg.train
    try:
        with _quiet("medsft.data.dataset"), _quiet("medsft.data.records"):  # the numbers are printed here
            data = build_sft_data(cfg.data, tok, seed=cfg.seed, use_cache=use_cache, progress=False)
    except DataError as err:
        return {"plan_error": str(err)}
    order = DataOrder.from_config(cfg.data, data.train, cfg.seed, tok.pad_token_id)
    world = int(cfg.launcher.num_processes)
    plan = order.plan(t.train_bsz_per_gpu, t.gradient_accumulation_steps, world, t.n_epochs, t.max_steps)
    return {
        "train_examples": len(data.train), "val_examples": len(data.val or []),
        "packed_rows": order.units if order.mode == "packed" else None,
        "bsz": plan.bsz, "accum": plan.accum, "world": plan.world, "epochs": plan.epochs, "max_steps": t.max_steps,
        "steps_per_epoch": plan.steps_per_epoch, "total_steps": plan.total_steps, "global_batch": plan.global_batch,
    }


def cmd_sample(args: argparse.Namespace) -> int:
    if args.n < 1:
        raise DataError(f"--n {args.n} must be >= 1")
    data = _data_cfg(args)
    sc = _one_source(data, args.source, "sample")
    out = Path(args.out)
    src = Path(str(sc.spec.path))
    if out.exists() and src.exists() and out.resolve() == src.resolve():
        raise DataError(f"--out {args.out} is the input file; write the sample elsewhere")
    result = open_scanned(sc, data)
    report = result.report
    n = min(args.n, len(result))
    if n < args.n:
        print(f"note: only {len(result)} valid records; writing all of them", file=sys.stderr)
    picked = np.asarray(sorted(random.Random(args.seed).sample(range(len(result)), n)), dtype=np.int64)
    has_spans = len(picked) and int(result.start[picked[0]]) >= 0
    items = result.source.read(result.index[picked], result.start[picked] if has_spans else None,
                               result.end[picked] if has_spans else None, result.line[picked])
    rows = [item.value for item in items]
    jsonl = out.suffix.lower() in (".jsonl", ".ndjson")
    dump = lambda r: json.dumps(r, ensure_ascii=False, default=str)  # noqa: E731 - parquet rows may hold dates
    text = ("".join(dump(r) + "\n" for r in rows) if jsonl
            else json.dumps(rows, ensure_ascii=False, indent=2, default=str) + "\n")
    if out.parent and not out.parent.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent if str(out.parent) else ".", prefix=f".{out.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, out)
    print(f"wrote {n} records (seed {args.seed}) of {report.total} from {sc.spec.path} to {out}")
    return 0


_GREEN, _DIM, _RESET = "\033[1;32m", "\033[2m", "\033[0m"


def cmd_show(args: argparse.Namespace) -> int:
    data = _data_cfg(args)
    data.on_invalid = "skip"
    sc = _one_source(data, args.source, "show")
    with _quiet("medsft.data.records", "medsft.data.dataset"):
        result = open_scanned(sc, data)
    report = result.report
    where = np.flatnonzero(result.index == args.index)
    if not len(where):
        bad = next((m for m in report.invalid if m.startswith(f"#{args.index} ")), None)
        if bad:
            raise DataError(f"{report.path}: record {bad}")
        raise DataError(f"{report.path}: no record #{args.index} (indices 0..{report.total - 1})")
    rec = result.rows(where)[0]
    tok = _load_tokenizer(args.model)
    r = render_records(tok, [rec], data.response_template, data.system_prompt)[0]
    last_only = data.loss_turns == "last"
    spans = r.loss_spans()[-1:] if last_only else r.loss_spans()
    status = "no --max-seq-len given: not cut"
    ids, end = r.ids, len(r.ids)
    if args.max_seq_len:
        res = apply_length_policy(r, args.max_seq_len, data.overlong if data.overlong != "error" else "drop", rec,
                                  last_only)
        if res.example is None:
            status = f"{res.status} at max_seq_len={args.max_seq_len} (data.overlong={data.overlong}): never trained"
        else:
            ids = res.example["input_ids"]
            end = len(ids)
            status = f"{res.status} at max_seq_len={args.max_seq_len}"
    spans = [(s, min(e, end)) for s, e in spans if s < end]
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty() and not os.environ.get("NO_COLOR"))
    dec = lambda xs: tok.decode(xs, skip_special_tokens=False, clean_up_tokenization_spaces=False)  # noqa: E731
    n_loss = sum(e - s for s, e in spans)
    first = spans[0][0] if spans else len(ids)
    loss_end = spans[-1][1] if spans else len(ids)
    turns = f", {len(spans)} assistant turns" if len(spans) > 1 else ""
    print(f"# {rec.where()} | {args.model} | {len(ids)} tokens: prompt {first} (no loss), "
          f"{n_loss} carrying loss{turns}, {len(ids) - loss_end} after the end of turn (no loss) | {status}")
    pieces, pos = [], 0
    for s, e in spans:
        pieces.append((False, dec(ids[pos:s])))
        pieces.append((True, dec(ids[s:e])))
        pos = e
    pieces.append((False, dec(ids[pos:])))
    if color:
        print(f"# legend: {_DIM}prompt (no loss){_RESET} {_GREEN}trained on (loss){_RESET}")
        sys.stdout.write("".join(f"{_GREEN if loss else _DIM}{text}{_RESET}" for loss, text in pieces) + "\n")
    else:
        print("# legend: the text inside [[ ]] carries loss; the rest is context only")
        sys.stdout.write("".join(f"[[{text}]]" if loss else text for loss, text in pieces) + "\n")
    return 0


# ------------------------------------------------------------------------------------------------------ main


# Commands of README.md (tests/test_cli_help.py checks that each is there).
EXAMPLES = [
    ("medsft data show data/demo_data.json --index 0 --model tiny-random:llama", "loss-carrying part marked"),
    ("medsft data check data/demo_data.json", "exit 0 valid / 1 invalid"),
    ("medsft data stats data/demo_data.json", "token lengths and the demo run's 48 steps"),
    ("medsft data stats data/demo_data.json experiment=local_test", "... of the seed's 1-GPU smoke test"),
    ("medsft data sample data/demo_data.json --n 10 --out data/test_sample.json", "a seeded subset"),
]
STATS_EXAMPLES = [e for e in EXAMPLES if e[0].startswith("medsft data stats")]


def build_parser() -> argparse.ArgumentParser:
    d = _production_config().data
    parser = CommandParser(prog="medsft data", description=__doc__, epilog=examples_block(EXAMPLES))
    sub = parser.add_subparsers(dest="command", metavar="{check,stats,sample,show}")
    sub.required = True

    p = sub.add_parser("check", help="validate a data source or mixture (exit 0 valid, 1 invalid)")
    _add_common(p)
    p.add_argument("--max-errors", type=int, default=50, help="invalid records listed (default 50)")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("stats", help="token lengths, share over max_seq_len, the steps of the run a config composes",
                       description="medsft data stats: token lengths of a data source as training renders them, the "
                                   "share over data.max_seq_len, and the optimizer steps of the run `python "
                                   "launch.py <overrides> data.path=SOURCE` would do (the demo preset unless "
                                   "experiment= is given).", epilog=examples_block(STATS_EXAMPLES))
    _add_common(p)
    _add_render(p, model_required=False)
    p.add_argument("--max-seq-len", type=int, default=None, help="data.max_seq_len (default: the config's)")
    p.add_argument("--overlong", default=None, choices=["drop", "truncate", "error"], help="data.overlong")
    p.add_argument("--on-invalid", default=None, choices=["error", "skip"], help="data.on_invalid")
    p.add_argument("--bsz", type=int, default=None, help="train.train_bsz_per_gpu (default: the config's)")
    p.add_argument("--accum", type=int, default=None, help="train.gradient_accumulation_steps")
    p.add_argument("--world", type=int, default=None, help="processes (GPUs): launcher.num_processes")
    p.add_argument("--epochs", type=int, default=None, help="train.n_epochs")
    p.add_argument("--num-proc", type=int, default=None, help="tokenizing processes (data.num_proc)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the tokenization cache")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("sample", help="write a seeded random subset of the valid records")
    _add_common(p)
    p.add_argument("--n", type=int, default=10)
    p.add_argument("--out", required=True, help="output file (.json list, or .jsonl)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--on-invalid", default="error", choices=["error", "skip"])
    p.add_argument("--source", default=None, help="the mixture source to sample (its name)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("show", help="print one record's training text with the loss-carrying part marked")
    _add_common(p)
    _add_render(p)
    p.add_argument("--index", type=int, required=True, help="record index in the file (0-based, as in messages)")
    p.add_argument("--max-seq-len", type=int, default=None, help="apply the length policy at this length")
    p.add_argument("--overlong", default=d.overlong, choices=["drop", "truncate", "error"])
    p.add_argument("--color", default="auto", choices=["auto", "always", "never"])
    p.add_argument("--source", default=None, help="the mixture source to show (its name)")
    p.set_defaults(func=cmd_show)
    return parser


def cli_main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    # Overrides may come after options (`--model M data.cache_dir=...`): they join the positional ones.
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.targets = list(args.targets) + extra
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except MedsftError as err:
        print(f"medsft data {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(cli_main())
