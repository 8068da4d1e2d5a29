"""Distributed engines side by side: plain DDP, DeepSpeed ZeRO-2, ZeRO-3 and FSDP2, each a real `python launch.py`
job (the relaunch included) on the same model, data, batch and steps, in ONE invocation.

    python benchmarks/distributed.py                 # CPU: tiny + ~30M Llama, 2 gloo processes, 2 rounds
    python benchmarks/distributed.py --gpu           # every visible GPU: 1B Llama shape, bf16
    python benchmarks/distributed.py --smoke         # tiny model, DDP + FSDP2, 3 steps: plumbing (tests use it)
    python benchmarks/distributed.py --engines ddp,fsdp2,fsdp2_sgo --models cpu30m --rounds 3

engines (--engines):
  ddp          deepspeed=none fsdp=none: every process holds the whole model, gradients all-reduced
  zero2        deepspeed=zero2_local: gradients and optimizer state sharded (DeepSpeed)
  zero3        deepspeed=zero3: parameters too (DeepSpeed)
  fsdp2        fsdp=full_shard: parameters, gradients and optimizer state sharded (PyTorch FSDP2)
  fsdp2_sgo    fsdp=shard_grad_op (not in the default list): parameters kept gathered through forward+backward

models (--models): `tiny` (conf/model/tiny_random.yaml, ~0.1M parameters), `cpu30m` (29.5M-parameter Llama,
vocab 8192) and `gpu1b` (Llama-3.2-1B shape, 1.24B) as benchmarks/throughput.py builds them: random weights and a
byte-level BPE tokenizer trained on the data, nothing from the Hub.

What is measured, per (model, engine, round): tokens/s of the whole job (real tokens of every process over the
summed step times medsft logs, the first --warmup steps left out) and, per process, the peak RSS (the kernel's
ru_maxrss of each training process, from start-up to the end of training) and on CUDA the peak allocated GPU
memory. Every engine trains the same --steps optimizer steps of --bsz x --accum x processes examples from the
same initial weights; step 1's loss is printed for each, and must agree across engines (same work).

Rounds are interleaved, the order alternating between rounds, so load from other processes hits every engine
alike; each engine's headline is its best round (load only slows a run down), the median and every round beside
it; the ratio to DDP is best-to-best, with the per-round ratios too. Output: a table and one JSON line per
result on stdout (`--json-out FILE` writes the JSON lines to a file as well). Engines whose package is missing
(DeepSpeed) are skipped with a message.

Data: HuatuoGPT-o1's English demo records (MEDSFT_HUATUO_DEMO or /work/shared/data/huatuo_o1/demo_data.json;
skipped with a message when absent) plus the bundled Spanish data/demo_data.json (benchmarks/throughput.py's).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from throughput import SHAPES, build_model, mixed_records  # noqa: E402 - the same models and data

ENGINES = {
    "ddp": ("deepspeed=none", "fsdp=none"),
    "zero2": ("deepspeed=zero2_local", "fsdp=none"),
    "zero3": ("deepspeed=zero3", "fsdp=none"),
    "fsdp2": ("deepspeed=none", "fsdp=full_shard"),
    "fsdp2_sgo": ("deepspeed=none", "fsdp=shard_grad_op"),
}
DEFAULT_ENGINES = ("ddp", "zero2", "zero3", "fsdp2")
RUN_TIMEOUT_S = 3600


@dataclass
class Result:
    model: str
    engine: str
    round: int
    ok: bool
    tokens: int = 0
    seconds: float = 0.0
    steps_timed: int = 0
    loss_step1: Optional[float] = None
    loss_last: Optional[float] = None
    peak_rss_mib: list = field(default_factory=list)  # per process, rank order
    peak_gpu_gib: list = field(default_factory=list)
    wall_s: float = 0.0
    error: str = ""

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu", action="store_true", help="CUDA: 1B Llama shape, bf16, one process per visible GPU")
    p.add_argument("--smoke", action="store_true", help="tiny model, DDP + FSDP2, 3 steps: plumbing only")
    p.add_argument("--models", default=None, help="comma list of tiny, cpu30m, gpu1b (default tiny,cpu30m; GPU gpu1b)")
    p.add_argument("--engines", default=None, help=f"comma list of {', '.join(ENGINES)} "
                                                   f"(default {','.join(DEFAULT_ENGINES)})")
    p.add_argument("--processes", type=int, default=None, help="processes per job (default 2 CPU, GPU count)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per job (default 10)")
    p.add_argument("--warmup", type=int, default=None, help="first steps not timed (default 2)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 2)")
    p.add_argument("--bsz", type=int, default=None, help="examples per micro-batch per process (default 2)")
    p.add_argument("--accum", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--seq", type=int, default=None, help="data.max_seq_len (default 1024 CPU, 2048 GPU)")
    p.add_argument("--work-dir", default=None, help="models, data, runs (default: a temp dir; models reused there)")
    p.add_argument("--keep-runs", action="store_true", help="keep each job's run folder and logs")
    p.add_argument("--json-out", default=None)
    a = p.parse_args(argv)
    if a.smoke:
        d = dict(models="tiny", engines="ddp,fsdp2", steps=3, warmup=1, rounds=1, bsz=2, seq=512)
    elif a.gpu:
        d = dict(models="gpu1b", engines=",".join(DEFAULT_ENGINES), steps=10, warmup=2, rounds=2, bsz=2, seq=2048)
    else:
        d = dict(models="tiny,cpu30m", engines=",".join(DEFAULT_ENGINES), steps=10, warmup=2, rounds=2, bsz=2,
                 seq=1024)
    a.models = [m for m in (a.models or d["models"]).split(",") if m]
    a.engines = [e for e in (a.engines or d["engines"]).split(",") if e]
    for name, allowed in (("models", ("tiny", *SHAPES)), ("engines", ENGINES)):
        unknown = [x for x in getattr(a, name) if x not in allowed]
        if unknown:
            p.error(f"--{name}: unknown {unknown}; choose from {sorted(allowed)}")
    for key in ("steps", "warmup", "rounds", "bsz", "seq"):
        if getattr(a, key) is None:
            setattr(a, key, d[key])
    if a.warmup >= a.steps:
        p.error(f"--warmup ({a.warmup}) must be below --steps ({a.steps})")
    return a


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def deepspeed_available() -> bool:
    try:  # the optional extra `deepspeed`
        import deepspeed  # noqa: F401
    except Exception:  # noqa: BLE001 - missing or broken: its engines are skipped
        return False
    return True


class Bench:
    def __init__(self, args, work: Path, data_path: Path, model_dirs: dict[str, str]):
        self.args, self.work, self.data_path, self.model_dirs = args, work, data_path, model_dirs
        self.cuda = bool(args.gpu)
        self.processes = args.processes or (max(1, gpu_count()) if self.cuda else 2)

    def overrides(self, model: str, engine: str, run: Path) -> list[str]:
        a = self.args
        model_args = ["model=tiny_random", f"model.cache_dir={self.work / 'models'}"] if model == "tiny" else [
            "model=tiny_random", f"model.path={self.model_dirs[model]}"]
        return [
            *model_args,
            *ENGINES[engine],
            f"data.path={self.data_path}", f"data.max_seq_len={a.seq}", "data.overlong=truncate", "data.val_ratio=0",
            f"train.train_bsz_per_gpu={a.bsz}", f"train.gradient_accumulation_steps={a.accum}",
            f"train.max_steps={a.steps}", "train.n_epochs=1",
            f"train.mixed_precision={'bf16' if self.cuda else 'no'}",
            "optimizer.learning_rate=1e-4", "optimizer.warmup_rates=0", "optimizer.scheduler=constant",
            f"launcher.num_processes={self.processes}", f"launcher.cpu={'false' if self.cuda else 'true'}",
            "logging=none", "logging.every_n_steps=1", "logging.progress_bar=false", "logging.plot=false",
            "generation_check.enabled=false", "checkpoint.save_final=false", "checkpoint.save_at_epoch_end=false",
            "resume.from_checkpoint=never", "resume.overwrite=true",
            f"output_dir={run / 'ckpts'}", f"log_dir={run / 'logs'}", f"experiment_name={model}_{engine}",
            f"hydra.run.dir={run / 'run'}",
        ]

    def run(self, model: str, engine: str, rnd: int) -> Result:
        run = self.work / "runs" / f"{model}_{engine}_{rnd}"
        shutil.rmtree(run, ignore_errors=True)
        dump = run / "dump"
        env = {**os.environ, "MEDSFT_DEBUG_DUMP": str(dump), "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"}
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, str(ROOT / "launch.py"), *self.overrides(model, engine, run)],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
        wall = time.perf_counter() - started
        result = Result(model=model, engine=engine, round=rnd, ok=proc.returncode == 0, wall_s=round(wall, 1))
        (run / "out.txt").parent.mkdir(parents=True, exist_ok=True)
        (run / "out.txt").write_text(proc.stdout + proc.stderr, encoding="utf-8")
        if proc.returncode != 0:
            result.error = f"exit {proc.returncode}: " + (proc.stdout + proc.stderr)[-1500:]
            return result
        records = [json.loads(line) for line in (run / "run" / "metrics.jsonl").read_text().splitlines() if line]
        train = [r for r in records if r.get("kind") == "train"]
        timed = [r for r in train if r["step"] > self.args.warmup and r.get("tokens_per_s")]
        result.tokens = sum(int(r["tokens"]) for r in timed)
        result.seconds = sum(r["tokens"] / r["tokens_per_s"] for r in timed)
        result.steps_timed = len(timed)
        result.loss_step1 = train[0]["loss"] if train else None
        result.loss_last = train[-1]["loss"] if train else None
        for rank in range(self.processes):
            dumped = json.loads((dump / f"rank{rank}.json").read_text())
            result.peak_rss_mib.append(round(dumped["peak_rss_mib"], 1))
            if dumped.get("peak_gpu_mem_gib") is not None:
                result.peak_gpu_gib.append(round(dumped["peak_gpu_mem_gib"], 3))
        if not self.args.keep_runs:
            shutil.rmtree(run / "ckpts", ignore_errors=True)
        return result


def summarize(results: list[Result], models: list[str], engines: list[str]) -> list[dict]:
    rows = []
    for model in models:
        ddp = {r.round: r for r in results if r.model == model and r.engine == "ddp" and r.ok}
        ddp_best = max((r.tokens_per_s for r in ddp.values()), default=0.0)
        for engine in engines:
            mine = [r for r in results if r.model == model and r.engine == engine]
            ok = [r for r in mine if r.ok]
            if not ok:
                rows.append({"bench": "distributed", "model": model, "engine": engine, "ok": False,
                             "error": mine[0].error if mine else "not run"})
                continue
            rates = [r.tokens_per_s for r in ok]
            best = max(rates)
            rss = [max(r.peak_rss_mib) for r in ok]
            row = {
                "bench": "distributed", "model": model, "engine": engine, "ok": True,
                "tokens_per_s_best": round(best, 1), "tokens_per_s_median": round(statistics.median(rates), 1),
                "tokens_per_s_rounds": [round(x, 1) for x in rates],
                "vs_ddp_best": round(best / ddp_best, 3) if ddp_best else None,
                "vs_ddp_rounds": [round(r.tokens_per_s / ddp[r.round].tokens_per_s, 3) for r in ok
                                  if r.round in ddp and ddp[r.round].tokens_per_s],
                # Peak RSS of the largest process, median over rounds; every process of the first round beside it.
                "peak_rss_mib_per_process": round(statistics.median(rss), 1),
                "peak_rss_mib_ranks": ok[0].peak_rss_mib,
                "peak_gpu_gib_per_process": max(ok[0].peak_gpu_gib) if ok[0].peak_gpu_gib else None,
                "loss_step1": ok[0].loss_step1, "loss_last": ok[0].loss_last,
                "steps_timed": ok[0].steps_timed, "tokens_timed": ok[0].tokens,
            }
            rows.append(row)
    return rows


def print_table(rows: list[dict], header: str) -> None:
    print("\n" + header)
    cols = f"{'model':<8} {'engine':<10} {'tok/s best':>11} {'median':>9} {'vs DDP':>7} {'RSS MiB/proc':>13} " \
           f"{'GPU GiB/proc':>13} {'loss step 1':>12}"
    print(cols)
    print("-" * len(cols))
    for r in rows:
        if not r["ok"]:
            print(f"{r['model']:<8} {r['engine']:<10} FAILED: {r['error'].splitlines()[-1] if r['error'] else ''}")
            continue
        gpu = f"{r['peak_gpu_gib_per_process']:.2f}" if r["peak_gpu_gib_per_process"] is not None else "-"
        vs = f"{r['vs_ddp_best']:.2f}x" if r["vs_ddp_best"] is not None else "-"
        print(f"{r['model']:<8} {r['engine']:<10} {r['tokens_per_s_best']:>11.1f} {r['tokens_per_s_median']:>9.1f} "
              f"{vs:>7} {r['peak_rss_mib_per_process']:>13.1f} {gpu:>13} {r['loss_step1']:>12.6f}")


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if args.gpu and not torch.cuda.is_available():
        print("--gpu: no CUDA device here", file=sys.stderr)
        return 2
    engines = list(args.engines)
    if any(e.startswith("zero") for e in engines) and not deepspeed_available():
        print("DeepSpeed is not installed (DS_BUILD_OPS=0 pip install -e '.[deepspeed]'): zero2/zero3 skipped",
              file=sys.stderr)
        engines = [e for e in engines if not e.startswith("zero")]
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="medsft-bench-dist-"))
    work.mkdir(parents=True, exist_ok=True)
    records, data_note = mixed_records()
    data_path = work / "mixed.json"
    data_path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    model_dirs = {m: build_model(work / f"model-{m}", m, records) for m in args.models if m != "tiny"}
    bench = Bench(args, work, data_path, model_dirs)
    env = {"bench": "env", "torch": torch.__version__, "device": torch.cuda.get_device_name() if bench.cuda else "cpu",
           "processes": bench.processes, "models": args.models, "engines": engines, "steps": args.steps,
           "warmup": args.warmup, "rounds": args.rounds, "bsz": args.bsz, "accum": args.accum, "seq": args.seq,
           "mixed_precision": "bf16" if bench.cuda else "no", "data": data_note,
           "load_avg": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    print(json.dumps(env), flush=True)
    results: list[Result] = []
    for rnd in range(args.rounds):
        for model in args.models:
            order = engines if rnd % 2 == 0 else list(reversed(engines))  # alternate who goes first
            for engine in order:
                result = bench.run(model, engine, rnd)
                results.append(result)
                print(json.dumps({"bench": "distributed_round", **asdict(result),
                                  "tokens_per_s": round(result.tokens_per_s, 1)}), flush=True)
    rows = summarize(results, args.models, engines)
    steps = f"{args.steps} steps ({args.warmup} untimed)"
    print_table(rows, f"== DDP / ZeRO / FSDP2: {bench.processes} process(es), {args.bsz} x {args.accum} per process, "
                      f"seq {args.seq}, {steps}, {args.rounds} round(s), {env['device']} ==")
    for row in rows:
        print(json.dumps(row), flush=True)
    if args.json_out:
        Path(args.json_out).write_text("".join(json.dumps(x) + "\n" for x in [env, *rows]), encoding="utf-8")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
