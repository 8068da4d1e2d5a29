"""Data at scale: validation, tokenization and the memory the tokenized data takes, medsft now against another
checkout of medsft (the commit before a change), side by side in one run.

    python benchmarks/data_scale.py --baseline /path/to/old/checkout            # 200 000 records, both versions
    python benchmarks/data_scale.py --records 1000000 --steps build,map          # 1 M records, this version only
    python benchmarks/data_scale.py --smoke                                      # plumbing only (tests)

The records are generated from the bundled data/demo_data.json (its 88 open Spanish records, each question given a
distinct case number): 200 000 of them are a ~234 MB JSON list (110 M tokens with tiny-random:llama's
tokenizer at max_seq_len 2048, the figures of issue 18). Every measurement runs in a FRESH Python process
(`sys.path` set to the version's checkout), with MEDSFT_CACHE pointing at a folder of its own:

  check   `medsft data check FILE`: wall time, peak RSS
  stats   `medsft data stats FILE --model tiny-random:llama --max-seq-len 2048` (cold cache): wall, peak RSS
  build   one training process's data step, `build_sft_data` on a cold cache (read, validate, tokenize, write
          the cache): its wall time; the RSS before it, when the data is ready, and the peak (ru_maxrss), and
          the peak of its largest tokenizing worker (data.num_proc; the baseline has none)
  map     a second process on the warm cache (what every other rank of a run does): `build_sft_data`, then every
          training example read once (one epoch); RSS before / after and RSS per token, with the process's
          anonymous (heap) bytes from /proc/self/smaps_rollup: the rest of its RSS is the mapped cache file,
          pages every process of a node shares

Versions alternate within each round (baseline, current, then current, baseline in the next), so load from
other processes hits both alike; the ratios printed are of the best round of each (load only slows a run). On
a shared machine run it when it is idle: peak RSS is load-independent, wall times are not.
Output: one JSON line per measurement, then a summary table and the ratios (current / baseline).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "demo_data.json"
STEPS = ("check", "stats", "build", "map")

# What runs in the child process: {root} and {args} are filled in. It prints one JSON line.
CHILD = r'''
import gc, json, os, resource, sys, time
sys.path.insert(0, {root!r})
args = {args!r}

def status(key):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0

def heap():
    """Anonymous (heap) bytes: what this process holds of its own; mapped file pages are the rest of its RSS."""
    try:
        with open("/proc/self/smaps_rollup") as fh:
            return sum(int(l.split()[1]) * 1024 for l in fh if l.startswith("Anonymous:"))
    except OSError:
        return None

out = {{"step": args["step"], "version": args["version"]}}
if args["step"] in ("check", "stats"):
    from medsft.cli.data import cli_main
    argv = [args["step"], args["path"]]
    if args["step"] == "stats":
        argv += ["--model", "tiny-random:llama", "--max-seq-len", str(args["max_seq_len"]), "--json"]
    t0 = time.perf_counter()
    import contextlib, io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli_main(argv)
    out.update(rc=rc, seconds=round(time.perf_counter() - t0, 2))
    if args["step"] == "stats" and rc == 0:
        text = buf.getvalue()  # (deepspeed's import may print a line first)
        out["tokens"] = json.loads(text[text.index("{{"):])["sum_tokens"]
else:
    from medsft.config import compose
    from medsft.models import load_tokenizer
    from medsft.data.dataset import build_sft_data
    overrides = ["~experiment", "model=tiny_random", "data.path=" + args["path"],
                 "data.max_seq_len=" + str(args["max_seq_len"]), "data.val_ratio=0", "data.shuffle=true"]
    overrides += args["overrides"]
    cfg = compose(overrides)
    tok = load_tokenizer(cfg.model)
    gc.collect()
    out["rss_before"] = status("VmRSS")
    out["heap_before"] = heap()
    t0 = time.perf_counter()
    data = build_sft_data(cfg.data, tok, seed=0, progress=False)
    out["seconds"] = round(time.perf_counter() - t0, 2)
    gc.collect()
    out["rss_ready"] = status("VmRSS")
    out["heap_ready"] = heap()
    out["tokens"] = int(data.stats["tokens"])
    out["examples"] = len(data.train)
    out["cache"] = data.stats.get("cache")
    if args["step"] == "map":
        n = 0
        for ex in data.train:  # one epoch: every example read once, as the loop does
            n += len(ex["input_ids"])
        assert n == out["tokens"], (n, out["tokens"])
        gc.collect()
        out["rss_after_epoch"] = status("VmRSS")
        out["heap_after_epoch"] = heap()
out["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
out["peak_rss_child"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # the largest worker
print("RESULT " + json.dumps(out), flush=True)
'''


def make_records(n: int, path: Path) -> Path:
    """n records from the bundled demo records, each question with a distinct case number (a JSON list)."""
    # The 88 open-question records only (not the multiple-choice ones added later): the set issue 18 measured.
    base = [r for r in json.loads(DEMO.read_text(encoding="utf-8")) if r.get("Archivo_fuente") == "medsft_demo_v1"]
    with path.open("w", encoding="utf-8") as fh:
        fh.write("[\n")
        for i in range(n):
            r = base[i % len(base)]
            rec = {"Pregunta": f"{r['Pregunta']} (caso {i})", "Razonamiento_Complejo": r["Razonamiento_Complejo"],
                   "Respuesta": r["Respuesta"], "Archivo_fuente": r.get("Archivo_fuente")}
            fh.write(json.dumps(rec, ensure_ascii=False) + (",\n" if i < n - 1 else "\n"))
        fh.write("]\n")
    return path


def has_key(root: Path, key: str) -> bool:
    """Whether the checkout's conf/data/base.yaml has this data key (num_proc is new)."""
    return f"\n{key}:" in "\n" + (root / "conf" / "data" / "base.yaml").read_text(encoding="utf-8")


def run_child(root: Path, version: str, step: str, path: Path, cache: Path, max_seq_len: int, num_proc: Optional[int],
              timeout: int) -> dict:
    overrides = [f"data.cache_dir={cache / 'data'}"]
    if num_proc is not None and has_key(root, "num_proc"):
        overrides.append(f"data.num_proc={num_proc}")
    args = {"step": step, "version": version, "path": str(path), "max_seq_len": max_seq_len, "overrides": overrides}
    env = {**os.environ, "MEDSFT_CACHE": str(cache), "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM", "true")}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD.format(root=str(root), args=args)], capture_output=True,
                          text=True, env=env, timeout=timeout, cwd=str(root))
    wall = time.perf_counter() - t0
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"{version} {step} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    out = json.loads(line[len("RESULT "):])
    out["process_seconds"] = round(wall, 2)
    return out


def _mb(x: Optional[int]) -> str:
    return "-" if x is None else f"{x / 2**20:,.0f}"


def summarize(results: list[dict]) -> list[str]:
    """Best round per (version, step), and the ratios current / baseline."""
    best: dict[tuple, dict] = {}
    for r in results:
        k = (r["version"], r["step"])
        if k not in best or r["seconds"] < best[k]["seconds"]:
            best[k] = r
    lines = ["| version | step | seconds (best) | peak RSS MB | worker peak MB | data RSS MB when ready | "
             "RSS bytes/token | heap MB added by an epoch |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for (version, step), r in sorted(best.items(), key=lambda kv: (STEPS.index(kv[0][1]), kv[0][0])):
        ready = r["rss_ready"] - r["rss_before"] if "rss_ready" in r else None
        per_token = ((r["rss_after_epoch"] - r["rss_before"]) / r["tokens"]) if "rss_after_epoch" in r else None
        priv = (r["heap_after_epoch"] - r["heap_before"]) if r.get("heap_after_epoch") is not None else None
        lines.append(f"| {version} | {step} | {r['seconds']:.2f} | {_mb(r['peak_rss'])} | "
                     f"{_mb(r.get('peak_rss_child')) if r.get('peak_rss_child') else '-'} | {_mb(ready)} | "
                     f"{'-' if per_token is None else f'{per_token:.2f}'} | {_mb(priv)} |")
    for step in STEPS:
        a, b = best.get(("current", step)), best.get(("baseline", step))
        if a and b:
            lines.append(f"{step}: current / baseline: time {a['seconds'] / b['seconds']:.2f}x, peak RSS "
                         f"{a['peak_rss'] / b['peak_rss']:.2f}x")
    return lines


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=200_000)
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated, of {', '.join(STEPS)}")
    p.add_argument("--baseline", default=None, help="a checkout of medsft to compare with (e.g. the commit before)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--num-proc", type=int, default=None, help="data.num_proc of the current version (default: conf)")
    p.add_argument("--work", default=None, help="folder for the generated file and caches (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per measurement")
    p.add_argument("--smoke", action="store_true", help="500 records, every step, one round (tests)")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    if args.smoke:
        args.records = min(args.records, 500)
    steps = [s for s in args.steps.split(",") if s]
    unknown = sorted(set(steps) - set(STEPS))
    if unknown:
        p.error(f"unknown steps {unknown} (of {', '.join(STEPS)})")
    versions = [("current", ROOT)] + ([("baseline", Path(args.baseline).resolve())] if args.baseline else [])
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="medsft-data-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        path = work / f"records-{args.records}.json"
        if not path.exists():
            make_records(args.records, path)
        print(json.dumps({"records": args.records, "file_mb": round(path.stat().st_size / 2**20, 1),
                          "cpus": os.cpu_count(), "load_avg": os.getloadavg()[0]}), flush=True)
        results = []
        for rnd in range(args.rounds):
            order = versions if rnd % 2 == 0 else versions[::-1]
            for step in steps:
                for version, root in order:
                    cache = work / f"cache-{version}"
                    if step in ("stats", "build") and cache.exists():
                        shutil.rmtree(cache / "data", ignore_errors=True)  # a cold tokenization
                    if step == "map" and not (cache / "data").exists():
                        run_child(root, version, "build", path, cache, args.max_seq_len, args.num_proc, args.timeout)
                    r = run_child(root, version, step, path, cache, args.max_seq_len,
                                  args.num_proc if version == "current" else None, args.timeout)
                    r["round"] = rnd
                    results.append(r)
                    print(json.dumps(r), flush=True)
        lines = summarize(results)
        print("\n".join(lines), flush=True)
        if args.json_out:
            Path(args.json_out).write_text("".join(json.dumps(r) + "\n" for r in results), encoding="utf-8")
    finally:
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
