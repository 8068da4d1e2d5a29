"""GPU check of the distributed paths on ONE GPU (e.g. an H200): plain bf16, DeepSpeed zero2_local and zero3.

    python benchmarks/gpu_check.py                       # ~3-5 min; JSON lines on stdout, logs under --out
    python benchmarks/gpu_check.py --steps 20 --checks zero3 --out /tmp/gpu_check

Each check is a real `python launch.py ...` run (the relaunch path included) of a randomly initialised Llama of
about 140M parameters (model=tiny_random with a larger shape: built locally, no Hub needed) on the bundled
Spanish data, bf16. One JSON object per line:

    {"check": "env", ...}            GPU, versions, bf16 support
    {"check": "bf16", ...}           tokens/s (median after warm-up), loss first/last, peak GPU memory, wall time
    {"check": "zero2_local", ...}    the same under DeepSpeed ZeRO-2 (+ DeepSpeed's batch/accumulation view)
    {"check": "zero3", ...}          the same under ZeRO-3, plus: the checkpoint reloaded with plain
                                     from_pretrained gives the job's logits, and holds every full tensor
    {"check": "summary", ...}        ok overall, DeepSpeed throughput relative to plain bf16

Exit code 0 when every check is ok. Needs torch (CUDA), transformers, accelerate, hydra-core, omegaconf and
deepspeed; a missing one is reported as {"check": "env", "ok": false, "missing": [...]}. `--cpu` smoke-tests
the script itself without a GPU (tiny model, fp32).

On a lent machine whose image lacks some of them (the project's H200 image has torch, transformers,
accelerate, safetensors, pyyaml, psutil, msgpack, einops, ninja, py-cpuinfo, but not hydra-core, omegaconf,
antlr4-python3-runtime, deepspeed, pydantic, pydantic-core, annotated-types, typing-inspection, hjson), put
them as wheels into an ignored `.whl/` here: `pip download --no-deps --only-binary=:all: --python-version 3.12
--platform manylinux_2_17_x86_64 -d .whl pydantic-core==...` for the compiled one, `pip wheel --no-deps -w .whl
NAME==VERSION` for the pure-Python and sdist-only ones (antlr4-python3-runtime, and deepspeed with
DS_BUILD_OPS=0), carry `.whl`, and run:

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
    python3 benchmarks/gpu_check.py --out $OUT
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKS = ("bf16", "zero2_local", "zero3")
# ~140M parameters: 12 layers of hidden 1024 (GQA 16/8 heads), vocab 512 from the tiny tokenizer.
MODEL = ("model=tiny_random", "model.tiny.hidden_size=1024", "model.tiny.intermediate_size=2816",
         "model.tiny.num_hidden_layers=12", "model.tiny.num_attention_heads=16", "model.tiny.num_key_value_heads=8")
WARMUP_STEPS = 5


def emit(record: dict) -> None:
    print(json.dumps(record, default=str), flush=True)


def environment() -> dict:
    record: dict = {"check": "env"}
    missing = []
    for name in ("torch", "transformers", "accelerate", "hydra", "omegaconf", "deepspeed", "safetensors"):
        try:
            module = importlib.import_module(name)
            record[name] = getattr(module, "__version__", "?")
        except Exception as err:  # noqa: BLE001 - report, do not crash
            missing.append(name)
            record[name] = f"missing ({type(err).__name__})"
    if "torch" not in missing:
        import torch

        record["cuda"] = torch.version.cuda
        record["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        record["gpu_count"] = torch.cuda.device_count()
        record["bf16_supported"] = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        if not torch.cuda.is_available():
            missing.append("cuda device")
    record["missing"] = missing
    record["ok"] = not missing
    return record


def run_check(name: str, args, out: Path) -> dict:
    work = out / name
    dump = work / "dump"
    overrides = [
        *(("model=tiny_random", "launcher.cpu=true") if args.cpu else MODEL),
        f"model.cache_dir={out / 'models'}",
        "logging=none",
        "logging.progress_bar=false",
        "generation_check.enabled=false",
        "data.val_ratio=0",
        f"data.max_seq_len={args.seq_len}",
        f"train.mixed_precision={'no' if args.cpu else 'bf16'}",
        f"train.train_bsz_per_gpu={args.bsz}",
        "train.gradient_accumulation_steps=1",
        "train.n_epochs=1000",
        f"train.max_steps={args.steps}",
        "optimizer.learning_rate=5e-4",
        "optimizer.warmup_rates=0.1",
        "checkpoint.save_at_epoch_end=false",
        "launcher.num_processes=1",
        f"deepspeed={'none' if name == 'bf16' else name}",
        f"experiment_name=gpu_check_{name}",
        f"output_dir={work / 'ckpts'}",
        f"log_dir={work / 'logs'}",
        f"hydra.run.dir={work / 'run'}",
    ]
    env = {**os.environ, "MEDSFT_DEBUG_DUMP": str(dump), "PYTHONUNBUFFERED": "1"}
    record: dict = {"check": name}
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with (work / "log.txt").open("w") as log:
        try:
            proc = subprocess.run([sys.executable, str(ROOT / "launch.py"), *overrides], cwd=ROOT, env=env,
                                  stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    record["wall_s"] = round(time.perf_counter() - started, 1)
    record["exit_code"] = code
    if code != 0:
        record["ok"] = False
        record["log_tail"] = (work / "log.txt").read_text(errors="replace")[-2500:]
        return record

    metrics = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [m for m in metrics if m.get("kind") == "train"]
    steady = [m["tokens_per_s"] for m in train if m["step"] > WARMUP_STEPS] or [m["tokens_per_s"] for m in train]
    finite = [m["loss"] for m in train if isinstance(m["loss"], float) and math.isfinite(m["loss"])]
    rank0 = json.loads((dump / "rank0.json").read_text())
    record.update({
        "steps": len(train),
        "tokens_per_step": train[-1]["tokens"] if train else None,
        "tokens_per_s": round(statistics.median(steady), 1) if steady else None,
        "loss_first": finite[0] if finite else None,
        "loss_last": finite[-1] if finite else None,
        "skipped_steps": rank0["skipped_steps"],
        "num_parameters": rank0["num_parameters"],
        "peak_gpu_mem_gib": round(rank0["peak_gpu_mem_gib"], 2) if rank0.get("peak_gpu_mem_gib") else None,
        "deepspeed": rank0["deepspeed"],
        "loss_scale": rank0["loss_scale"],
    })
    ok = bool(finite) and finite[-1] < finite[0] and rank0["optimizer_steps"] == len(train) - rank0["skipped_steps"]
    if name == "zero3":
        reload = reload_check(work, dump, cuda=not args.cpu)
        record["reload"] = reload
        ok = ok and reload["ok"]
    record["ok"] = ok
    return record


def reload_check(work: Path, dump: Path, cuda: bool = True) -> dict:
    """The ZeRO-3 checkpoint in THIS process (no DeepSpeed): full tensors, and the job's logits."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    ckpts = sorted((work / "ckpts").glob("*/checkpoint-*"), key=lambda p: int(p.name.rsplit("-", 1)[-1]))
    if not ckpts:
        return {"ok": False, "error": "no checkpoint"}
    path = ckpts[-1]
    numel, empty, dtypes = 0, [], set()
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            for key in handle.keys():
                tensor = handle.get_slice(key)
                count = math.prod(tensor.get_shape())
                numel += count
                dtypes.add(str(tensor.get_dtype()))
                if count == 0:
                    empty.append(key)
    reference = torch.load(dump / "reference_logits.pt")
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=cuda):
        logits = model(reference["input_ids"].to(device)).logits.float().cpu()
    diff = (logits - reference["logits"]).abs().max().item()
    scale = reference["logits"].abs().max().item()
    expected = json.loads((dump / "rank0.json").read_text())["num_parameters"]
    return {
        "ok": not empty and numel == expected and diff <= 2e-2 * max(scale, 1.0),
        "checkpoint": str(path),
        "saved_parameters": numel,
        "expected_parameters": expected,
        "saved_dtypes": sorted(dtypes),
        "empty_tensors": empty[:5],
        "max_abs_logit_diff": diff,
        "logit_scale": scale,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checks", default=",".join(CHECKS), help=f"comma-separated subset of {', '.join(CHECKS)}")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per check (first 5 = warm-up)")
    parser.add_argument("--bsz", type=int, default=16, help="examples per step (one GPU, no accumulation)")
    parser.add_argument("--seq-len", type=int, default=1024, help="data.max_seq_len")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per check")
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out", help="logs and checkpoints")
    parser.add_argument("--cpu", action="store_true",
                        help="smoke-test this script without a GPU (tiny model, fp32, CPU; throughput meaningless)")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    env = environment()
    if args.cpu:
        env["missing"] = [m for m in env["missing"] if m != "cuda device"]
        env["ok"] = not env["missing"]
    emit(env)
    if not env["ok"]:
        return 2
    results = []
    for name in [c.strip() for c in args.checks.split(",") if c.strip()]:
        if name not in CHECKS:
            emit({"check": name, "ok": False, "error": f"unknown check (known: {', '.join(CHECKS)})"})
            continue
        result = run_check(name, args, out)
        emit(result)
        results.append(result)
    by_name = {r["check"]: r for r in results}
    summary = {"check": "summary", "ok": bool(results) and all(r["ok"] for r in results)}
    base = by_name.get("bf16", {}).get("tokens_per_s")
    for name in ("zero2_local", "zero3"):
        value = by_name.get(name, {}).get("tokens_per_s")
        if base and value:
            summary[f"{name}_vs_bf16_throughput"] = round(value / base, 3)
    emit(summary)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
