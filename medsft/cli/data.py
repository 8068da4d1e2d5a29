"""`medsft data check|stats|sample|show`: look at a data file before training on it.

  medsft data check PATH [--fields-preset es|huatuo_en]           structure and validation; exit 0 valid, 1 not
  medsft data stats PATH [overrides] [--model M]                  token lengths, share over max_seq_len, and the
                                                                   optimizer steps of the run these overrides compose
  medsft data sample PATH --n 10 --out FILE [--seed S]            a seeded random subset, records unchanged
  medsft data show PATH --index I --model M                       the training text, loss-carrying part marked

`stats` composes the config `python launch.py <overrides> data.path=PATH` would train with (the demo preset
unless experiment= is given) and reports its numbers: max_seq_len, the validation split, batch, accumulation,
processes and epochs all come from that config (--max-seq-len, --bsz, --accum, --world, --epochs override them).
--model takes what model.path takes: a local directory, `tiny-random:llama`, `embedded:smollm2-135m-instruct`
or a Hub id (resolved and loaded exactly as training loads it); without it, the composed config's model. Field
presets are the files of conf/data/ (`es` = the Spanish default schema). Exit codes: 0 ok, 1 bad data / path /
model / config, 2 bad usage (argparse).
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

from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from medsft.cli.usage import CommandParser, examples_block
from medsft.config import compose, unknown_override_keys, validate
from medsft.config.presets import describe_experiment, experiment_of
from medsft.data.dataset import build_sft_data, tokenize_records
from medsft.data.records import load_records, read_raw
from medsft.data.render import apply_length_policy, ensure_chat_template, render_records
from medsft.errors import DataError, MedsftError
from medsft.paths import CONF_DIR

log = logging.getLogger("medsft.data")


# --------------------------------------------------------------------------------------------------- helpers


def presets() -> list[str]:
    names = {"es"}
    names.update(p.stem for p in (CONF_DIR / "data").glob("*.yaml") if p.stem != "base")
    return sorted(names)


def _production_config(*overrides: str) -> DictConfig:
    """The config a run composes to without an experiment preset: conf/'s defaults (the seed's values)."""
    return compose(["~experiment", *overrides])


def fields_for(preset: Optional[str]) -> DictConfig:
    """The field map of a conf/data preset (`es`: the Spanish default schema of conf/data/base.yaml)."""
    if preset in (None, "", "es"):
        return _production_config().data.fields
    if preset not in presets():
        raise DataError(f"--fields-preset {preset!r}: no such preset (available: {', '.join(presets())})")
    return _production_config(f"data={preset}").data.fields


def _data_cfg(args: argparse.Namespace) -> DictConfig:
    """The `data` node training would use, with this command's path, field preset and options."""
    cfg = _production_config().data
    cfg.path = args.path
    cfg.fields = fields_for(getattr(args, "fields_preset", None))
    for key in ("format", "on_invalid", "max_seq_len", "overlong", "system_prompt", "response_template"):
        value = getattr(args, key, None)
        if value is not None:
            setattr(cfg, key, value)
    return cfg


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


# `medsft data stats` options that set a key of the composed config (None: the config's value).
_STATS_OPTIONS = {
    "max_seq_len": "data.max_seq_len",
    "overlong": "data.overlong",
    "on_invalid": "data.on_invalid",
    "format": "data.format",
    "system_prompt": "data.system_prompt",
    "response_template": "data.response_template",
    "bsz": "train.train_bsz_per_gpu",
    "accum": "train.gradient_accumulation_steps",
    "epochs": "train.n_epochs",
    "world": "launcher.num_processes",
}


def run_config(args: argparse.Namespace) -> DictConfig:
    """The training config `python launch.py <overrides> data.path=PATH` composes (with `--fields-preset` as
    `data=<preset>` and the options above set on it), validated."""
    overrides = list(args.overrides)
    problems = unknown_override_keys(overrides)
    bad = [o for o in overrides if "=" not in o and not o.startswith("~")]
    if bad:
        problems.append(f"{', '.join(map(repr, bad))}: overrides are key=value (e.g. experiment=local_test)")
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
    cfg.data.path = args.path
    if args.model:
        cfg.model.path = args.model
    for option, key in _STATS_OPTIONS.items():
        value = getattr(args, option, None)
        if value is not None:
            node, leaf = key.rsplit(".", 1)
            setattr(cfg[node], leaf, value)
    validate(cfg)
    return cfg


@contextlib.contextmanager
def _quiet(name: str):
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _percentiles(values: Sequence[int]) -> dict:
    if not values:
        return {}
    s = sorted(values)

    def q(p: float) -> int:
        return s[min(len(s) - 1, int(round(p * (len(s) - 1))))]

    return {"min": s[0], "p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": s[-1],
            "mean": round(statistics.fmean(s), 1)}


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="a .json (list of records) / .jsonl / .parquet file")
    p.add_argument("--fields-preset", default=None, metavar="NAME",
                   help="field mapping: es (default: Pregunta/Razonamiento_Complejo/Respuesta) or huatuo_en "
                        "(Question/Complex_CoT/Response), i.e. a conf/data/<NAME>.yaml")
    p.add_argument("--format", default=None, choices=["auto", "json", "jsonl", "parquet"])


def _add_render(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model.path: directory, tiny-random:llama, embedded:..., hub id")
    p.add_argument("--system-prompt", default=None)
    p.add_argument("--response-template", default=None, help="default: the HuatuoGPT-o1 layout")


# -------------------------------------------------------------------------------------------------- commands


def cmd_check(args: argparse.Namespace) -> int:
    fields = fields_for(args.fields_preset)
    with _quiet("medsft.data.records"):  # we print the report ourselves
        records, report = load_records(args.path, fields, on_invalid="skip", fmt=args.format or "auto")
    if report.invalid:
        shown = report.invalid[: args.max_errors]
        print(f"{args.path}: {len(report.invalid)} of {report.total} records invalid:", file=sys.stderr)
        for msg in shown:
            print(f"  {msg}", file=sys.stderr)
        if len(report.invalid) > len(shown):
            print(f"  ... and {len(report.invalid) - len(shown)} more", file=sys.stderr)
        print(f"INVALID: {report.summary()}", file=sys.stderr)
        return 1
    print(f"OK: {report.summary()}")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    cfg = run_config(args)
    data_cfg = cfg.data
    records, report = load_records(args.path, data_cfg.fields, on_invalid=data_cfg.on_invalid, fmt=data_cfg.format)
    tok = _load_tokenizer(cfg.model)
    rendered = tokenize_records(tok, records, report, data_cfg, use_cache=not args.no_cache)
    max_len = data_cfg.max_seq_len
    prompt = [r.prompt_len for r in rendered]
    response = [r.loss_end - r.prompt_len for r in rendered]  # content + end-of-turn token
    total = [len(r.ids) for r in rendered]
    over = sum(1 for r in rendered if r.loss_end > max_len)
    prompt_over = sum(1 for r in rendered if r.prompt_len >= max_len)
    kept = trained_tokens = loss_tokens = truncated = 0
    for r, rec in zip(rendered, records):
        res = apply_length_policy(r, max_len, "drop" if data_cfg.overlong == "error" else data_cfg.overlong, rec)
        if res.example is not None:
            kept += 1
            trained_tokens += len(res.example["input_ids"])
            loss_tokens += min(r.loss_end, len(res.example["input_ids"])) - r.prompt_len
            truncated += res.status == "truncated"
    preset, named = experiment_of(args.overrides)
    out: dict[str, Any] = {
        "path": args.path,
        "model": cfg.model.path,
        "experiment": preset,
        "records": report.total,
        "valid": report.kept,
        "invalid": len(report.invalid),
        "duplicates": report.duplicates,
        "prompt_tokens": _percentiles(prompt),
        "response_tokens": _percentiles(response),
        "total_tokens": _percentiles(total),
        "sum_tokens": sum(total),
        "max_seq_len": max_len,
        "over_max_seq_len": over,
        "over_max_seq_len_share": round(over / len(rendered), 4) if rendered else 0.0,
        "prompt_alone_over": prompt_over,
        "overlong_policy": data_cfg.overlong,
        "examples_after_policy": kept,
        "truncated": truncated,
        "trained_tokens": trained_tokens,
        "loss_tokens": loss_tokens,
    }
    out.update(_run_plan(cfg, tok, use_cache=not args.no_cache))
    if args.json:
        print(json.dumps(out, indent=2, ensure_ascii=False))
        return 0
    print(f"{args.path}: {report.total} records, {report.kept} valid"
          + (f", {len(report.invalid)} invalid (skipped)" if report.invalid else "")
          + (f", {report.duplicates} duplicates" if report.duplicates else ""))
    print(f"config: {describe_experiment(preset, named)}"
          + (f"; overrides: {' '.join(args.overrides)}" if args.overrides else ""))
    print(f"tokenizer: {cfg.model.path} (chat template rendering, as in training)")
    print(f"{'tokens':<22}{'min':>8}{'p50':>8}{'p90':>8}{'p99':>8}{'max':>8}{'mean':>10}")
    for label, key in (("prompt", "prompt_tokens"), ("response (+end turn)", "response_tokens"),
                       ("total", "total_tokens")):
        d = out[key]
        print(f"{label:<22}{d['min']:>8}{d['p50']:>8}{d['p90']:>8}{d['p99']:>8}{d['max']:>8}{d['mean']:>10}")
    print(f"total tokens: {out['sum_tokens']:,}")
    print(f"over max_seq_len={max_len}: {over} of {len(rendered)} ({100 * out['over_max_seq_len_share']:.1f}%)"
          + (f", {prompt_over} with the prompt alone over it (never trained)" if prompt_over else ""))
    if data_cfg.overlong == "error" and over:
        print(f"with data.overlong=error: training stops with an error ({over} records over the limit); with drop:")
    print(f"with data.overlong={data_cfg.overlong}: {kept} examples ({truncated} truncated), {trained_tokens:,} "
          f"tokens, {loss_tokens:,} carrying loss")
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
    src, out = Path(args.path), Path(args.out)
    if out.exists() and src.exists() and out.resolve() == src.resolve():
        raise DataError(f"--out {args.out} is the input file; write the sample elsewhere")
    records, report = load_records(args.path, fields_for(args.fields_preset), on_invalid=args.on_invalid,
                                   fmt=args.format or "auto")
    items = read_raw(args.path, args.format or "auto")[0]
    n = min(args.n, len(records))
    if n < args.n:
        print(f"note: only {len(records)} valid records; writing all of them", file=sys.stderr)
    picked = sorted(random.Random(args.seed).sample(range(len(records)), n))
    rows = [items[records[i].index][0] for i in picked]
    jsonl = out.suffix.lower() in (".jsonl", ".ndjson")
    text = ("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows) if jsonl
            else json.dumps(rows, ensure_ascii=False, indent=2) + "\n")
    if out.parent and not out.parent.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent if str(out.parent) else ".", prefix=f".{out.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, out)
    print(f"wrote {n} records (seed {args.seed}) of {report.total} from {args.path} to {out}")
    return 0


_GREEN, _DIM, _RESET = "\033[1;32m", "\033[2m", "\033[0m"


def cmd_show(args: argparse.Namespace) -> int:

    cfg = _data_cfg(args)
    with _quiet("medsft.data.records"):
        records, report = load_records(args.path, cfg.fields, on_invalid="skip", fmt=cfg.format)
    rec = next((r for r in records if r.index == args.index), None)
    if rec is None:
        bad = next((m for m in report.invalid if m.startswith(f"#{args.index} ")), None)
        if bad:
            raise DataError(f"{args.path}: record {bad}")
        raise DataError(f"{args.path}: no record #{args.index} (indices 0..{report.total - 1})")
    tok = _load_tokenizer(args.model)
    r = render_records(tok, [rec], cfg.response_template, cfg.system_prompt)[0]
    status = "no --max-seq-len given: not cut"
    ids, n_loss_end = r.ids, r.loss_end
    if args.max_seq_len:
        res = apply_length_policy(r, args.max_seq_len, cfg.overlong if cfg.overlong != "error" else "drop", rec)
        if res.example is None:
            status = f"{res.status} at max_seq_len={args.max_seq_len} (data.overlong={cfg.overlong}): never trained"
        else:
            ids = res.example["input_ids"]
            n_loss_end = min(r.loss_end, len(ids))
            status = f"{res.status} at max_seq_len={args.max_seq_len}"
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty() and not os.environ.get("NO_COLOR"))
    dec = lambda xs: tok.decode(xs, skip_special_tokens=False, clean_up_tokenization_spaces=False)  # noqa: E731
    prompt, loss, tail = dec(ids[: r.prompt_len]), dec(ids[r.prompt_len : n_loss_end]), dec(ids[n_loss_end:])
    n_loss = n_loss_end - r.prompt_len
    print(f"# {rec.where()} | {args.model} | {len(ids)} tokens: prompt {r.prompt_len} (no loss), "
          f"{n_loss} carrying loss, {len(ids) - n_loss_end} after the end of turn (no loss) | {status}")
    if color:
        print(f"# legend: {_DIM}prompt (no loss){_RESET} {_GREEN}trained on (loss){_RESET}")
        sys.stdout.write(f"{_DIM}{prompt}{_RESET}{_GREEN}{loss}{_RESET}{_DIM}{tail}{_RESET}\n")
    else:
        print("# legend: the text inside [[ ]] carries loss; the rest is context only")
        sys.stdout.write(f"{prompt}[[{loss}]]{tail}\n")
    return 0


# ------------------------------------------------------------------------------------------------------ main


# Commands of README.md (tests/test_cli_help.py checks that each is there).
EXAMPLES = [
    ("medsft data show data/demo_data.json --index 0 --model tiny-random:llama", "loss-carrying part marked"),
    ("medsft data check data/demo_data.json", "exit 0 valid / 1 invalid"),
    ("medsft data stats data/demo_data.json", "token lengths and the demo run's 40 steps"),
    ("medsft data stats data/demo_data.json experiment=local_test", "... of the seed's 1-GPU smoke test"),
    ("medsft data sample data/demo_data.json --n 10 --out data/test_sample.json", "a seeded subset"),
]
STATS_EXAMPLES = [e for e in EXAMPLES if e[0].startswith("medsft data stats")]


def build_parser() -> argparse.ArgumentParser:
    d = _production_config().data
    parser = CommandParser(prog="medsft data", description=__doc__, epilog=examples_block(EXAMPLES))
    sub = parser.add_subparsers(dest="command", metavar="{check,stats,sample,show}")
    sub.required = True

    p = sub.add_parser("check", help="validate a data file (exit 0 valid, 1 invalid)")
    _add_common(p)
    p.add_argument("--max-errors", type=int, default=50, help="invalid records listed (default 50)")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("stats", help="token lengths, share over max_seq_len, the steps of the run a config composes",
                       description="medsft data stats: token lengths of a data file as training renders them, the "
                                   "share over data.max_seq_len, and the optimizer steps of the run `python "
                                   "launch.py <overrides> data.path=PATH` would do (the demo preset unless "
                                   "experiment= is given).", epilog=examples_block(STATS_EXAMPLES))
    _add_common(p)
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="Hydra overrides of the run (experiment=local_test, model=tiny_random, data.val_ratio=0, ...)")
    p.add_argument("--model", default=None, help="model.path (default: the composed config's model)")
    p.add_argument("--system-prompt", default=None)
    p.add_argument("--response-template", default=None, help="default: the HuatuoGPT-o1 layout")
    p.add_argument("--max-seq-len", type=int, default=None, help="data.max_seq_len (default: the config's)")
    p.add_argument("--overlong", default=None, choices=["drop", "truncate", "error"], help="data.overlong")
    p.add_argument("--on-invalid", default=None, choices=["error", "skip"], help="data.on_invalid")
    p.add_argument("--bsz", type=int, default=None, help="train.train_bsz_per_gpu (default: the config's)")
    p.add_argument("--accum", type=int, default=None, help="train.gradient_accumulation_steps")
    p.add_argument("--world", type=int, default=None, help="processes (GPUs): launcher.num_processes")
    p.add_argument("--epochs", type=int, default=None, help="train.n_epochs")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the tokenization cache")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("sample", help="write a seeded random subset of the valid records")
    _add_common(p)
    p.add_argument("--n", type=int, default=10)
    p.add_argument("--out", required=True, help="output file (.json list, or .jsonl)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--on-invalid", default="error", choices=["error", "skip"])
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("show", help="print one record's training text with the loss-carrying part marked")
    _add_common(p)
    _add_render(p)
    p.add_argument("--index", type=int, required=True, help="record index in the file (0-based, as in messages)")
    p.add_argument("--max-seq-len", type=int, default=None, help="apply the length policy at this length")
    p.add_argument("--overlong", default=d.overlong, choices=["drop", "truncate", "error"])
    p.add_argument("--color", default="auto", choices=["auto", "always", "never"])
    p.set_defaults(func=cmd_show)
    return parser


def cli_main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    # parse_known_args: `stats` takes key=value overrides before and after its options alike.
    args, extra = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    if args.command == "stats":
        args.overrides += [e for e in extra if not e.startswith("-")]
        extra = [e for e in extra if e.startswith("-")]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except MedsftError as err:
        print(f"medsft data {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(cli_main())
