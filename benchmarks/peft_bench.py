"""Full fine-tuning against LoRA (r=16, r=64) and, on a GPU, QLoRA: trainable parameters, peak memory, step time
and checkpoint size, side by side in one invocation on the same data, steps and settings.

    python benchmarks/peft_bench.py                 # CPU: SmolLM2-135M (embedded), 132 Spanish records, seq 512, 8 steps
    python benchmarks/peft_bench.py --gpu           # one CUDA GPU: ~1B Llama shape (random), seq 2048, bf16, + QLoRA
    python benchmarks/peft_bench.py --smoke         # seconds: tiny random model, 2 steps (tests/test_peft.py runs it)

(Not `peft.py`: a script's folder comes first on sys.path, so that name would shadow the peft package.)

Each configuration runs in its own subprocess (so peak RSS is that configuration's alone) through medsft's own
training loop (`medsft.train.loop.setup` + `optimizer_step`, then `save` for the checkpoint), from the same
initial weights, examples (data/demo_data.json, same seed and order), micro-batch and optimizer settings,
gradient checkpointing on (LoRA's memory saving is in the weights' gradients and optimizer state; without
recomputation the activations, the same for every configuration, dominate at this shape: --no-gradient-checkpointing
measures that too) and medsft's defaults otherwise (on CPU, train.cpu_malloc_mmap_threshold_mb=4, so that freed
activations leave the resident set and the peak measures what training holds, not what glibc's heap kept):

  full       peft=none: every parameter trains
  lora_r16   peft=lora peft.r=16 peft.alpha=32 (all linear layers of the decoder)
  lora_r64   peft=lora peft.r=64 peft.alpha=128
  qlora_r16  peft=qlora peft.r=16 (--gpu only: 4-bit NF4 base, double quantisation, bf16 compute)

Reported per configuration: trainable / total parameters, training's peak memory: on CPU the peak RSS from the
end of `setup` (model and data loaded and resident) to the last step (VmHWM reset through /proc/self/clear_refs,
as torch.cuda.reset_peak_memory_stats does on GPU; the loading peak, imports and transient copies included, is
reported beside it), on GPU the peak CUDA memory (torch.cuda.max_memory_allocated), median step time over the
steps after the first (warm-up), and the size of the checkpoint folder medsft writes (weights + training state for exact resume), each also as a ratio to full
fine-tuning in the same invocation. The issue's goals are checked at the end: LoRA checkpoint <= 5% of full,
LoRA peak memory <= 0.6x full, QLoRA peak CUDA memory <= 0.4x full. One JSON line per configuration on stdout
(`--json-out FILE` also writes them to a file).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

CONFIGS = {
    "full": ["peft=none"],
    "lora_r16": ["peft=lora", "peft.r=16", "peft.alpha=32"],
    "lora_r64": ["peft=lora", "peft.r=64", "peft.alpha=128"],
    "qlora_r16": ["peft=qlora", "peft.r=16", "peft.alpha=32"],
}
GOALS = (("checkpoint_mb", "lora", 0.05), ("peak_mb", "lora", 0.6), ("peak_mb", "qlora", 0.4))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu", action="store_true", help="CUDA: ~1B Llama shape, seq 2048, bf16, with QLoRA")
    p.add_argument("--smoke", action="store_true", help="tiny random model, 2 steps: plumbing only")
    p.add_argument("--configs", default=None, help=f"comma-separated, of {', '.join(CONFIGS)}")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per configuration (default 8; smoke 2)")
    p.add_argument("--seq", type=int, default=None, help="data.max_seq_len (default 512 CPU, 2048 GPU)")
    p.add_argument("--bsz", type=int, default=None, help="examples per micro-batch (default 4)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--work-dir", default=None, help="models, checkpoints (default: a temp dir)")
    p.add_argument("--json-out", default=None)
    p.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false",
                   help="keep every activation (default: recompute them, as LoRA users train)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for every configuration (e.g. train.cpu_malloc_mmap_threshold_mb=0)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one configuration, in a subprocess
    a = p.parse_args(argv)
    default_configs = "full,lora_r16,lora_r64" + (",qlora_r16" if a.gpu else "")
    a.configs = [c for c in (a.configs or default_configs).split(",") if c]
    unknown = [c for c in a.configs if c not in CONFIGS]
    if unknown:
        p.error(f"unknown --configs {unknown}; choose from {list(CONFIGS)}")
    a.steps = a.steps or (2 if a.smoke else 8)
    a.seq = a.seq or (2048 if a.gpu else 512)
    a.bsz = a.bsz or (2 if a.smoke else 4)
    return a


def _model_overrides(args, work: Path) -> list[str]:
    if args.smoke:
        return ["model=tiny_random", f"model.cache_dir={work / 'models'}"]
    if args.gpu:
        from throughput import build_model, mixed_records  # the benchmarks' shared random-Llama builder

        model_dir = build_model(work / "gpu1b", "gpu1b", mixed_records()[0])
        return [f"model.path={model_dir}", "model.name=llama_1b_shape", "train.mixed_precision=bf16"]
    return ["model=smollm2_135m"]


def overrides(args, work: Path, name: str) -> list[str]:
    return [
        *_model_overrides(args, work), *CONFIGS[name], "~experiment", "logging=none", "logging.progress_bar=false",
        "generation_check.enabled=false", f"output_dir={work / 'ckpts'}", f"log_dir={work / 'logs'}",
        f"experiment_name={name}", f"data.max_seq_len={args.seq}", "data.overlong=truncate", "data.val_ratio=0",
        f"data.cache_dir={work / 'data-cache'}", f"train.train_bsz_per_gpu={args.bsz}",
        "train.gradient_accumulation_steps=1", f"train.max_steps={args.steps}", f"optimizer.learning_rate={args.lr}",
        "optimizer.warmup_rates=0", "checkpoint.max_ckpts=1", "model.chunked_loss=true",
        f"model.gradient_checkpointing={str(args.gradient_checkpointing).lower()}", *args.set,
    ]


def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    """VmHWM: this process's peak RSS since it started or since the last `_reset_peak_rss`."""
    with open("/proc/self/status") as handle:
        line = next(line for line in handle if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def _reset_peak_rss() -> bool:
    """Restart VmHWM at the current RSS (Linux >= 4.0), as torch.cuda.reset_peak_memory_stats does on GPU."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def worker(args, name: str, work: Path) -> dict:
    """One configuration in this (fresh) process: load, train --steps steps, save one checkpoint."""
    import torch

    from medsft.config import compose, validate
    from medsft.models.adapters import parameter_counts
    from medsft.train.loop import save, setup
    from medsft.train.loop import optimizer_step
    from medsft.train.metrics import MetricWindow

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = compose(overrides(args, work, name))
    validate(cfg)
    rss_start = _rss_mb()
    ctx = setup(cfg, work / "runs" / name)
    load_peak_mb = _peak_rss_mb()  # imports + loading the model and the data (transient copies included)
    # Training's own peak starts from here, the model resident: on CPU as on GPU (where the CUDA peak is reset).
    reset = _reset_peak_rss()
    cuda = torch.cuda.is_available() and ctx.accelerator.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    groups = ctx.order.step_groups(ctx.plan, 0, 0)[: args.steps]
    times, losses = [], []
    ctx.model.train()
    for group in groups:
        window = MetricWindow()
        started = time.perf_counter()
        optimizer_step(ctx, group, window)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
        losses.append(window.sums["loss_sum"] / max(window.sums["loss_tokens"], 1.0))
    process_peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # loading included
    peak_mb = _peak_rss_mb() if reset else process_peak_mb  # before the save: training's peak
    cuda_mb = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    path = save(ctx, 0)
    files = [p for p in path.rglob("*") if p.is_file()]
    state = sum(p.stat().st_size for p in files if "training_state" in p.parts)
    trainable, total = parameter_counts(ctx.accelerator.unwrap_model(ctx.model))
    return {
        "config": name, "device": str(ctx.accelerator.device), "mixed_precision": ctx.accelerator.mixed_precision,
        "trainable_params": trainable, "total_params": total, "steps": len(times),
        "step_s_median": statistics.median(times[1:] or times), "step_s_all": [round(t, 4) for t in times],
        "loss_first": losses[0], "loss_last": losses[-1],
        "peak_rss_mb": round(peak_mb, 1), "rss_start_mb": round(rss_start, 1),
        "load_peak_rss_mb": round(load_peak_mb, 1), "process_peak_rss_mb": round(process_peak_mb, 1),
        "peak_rss_is_training_only": reset, "gradient_checkpointing": bool(ctx.cfg.model.gradient_checkpointing),
        "cpu_malloc_mmap_threshold_mb": ctx.cfg.train.cpu_malloc_mmap_threshold_mb,
        "peak_cuda_mb": None if cuda_mb is None else round(cuda_mb, 1),
        "peak_mb": round(cuda_mb if cuda_mb is not None else peak_mb, 1),
        "checkpoint_mb": round(sum(p.stat().st_size for p in files) / 2**20, 3),
        "checkpoint_weights_mb": round((sum(p.stat().st_size for p in files) - state) / 2**20, 3),
        "checkpoint_state_mb": round(state / 2**20, 3),
    }


def run_config(args, name: str, work: Path) -> dict:
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--work-dir", str(work),
            "--steps", str(args.steps), "--seq", str(args.seq), "--bsz", str(args.bsz), "--lr", str(args.lr)]
    argv += (["--smoke"] if args.smoke else []) + (["--gpu"] if args.gpu else [])
    argv += ["--threads", str(args.threads)] if args.threads else []
    argv += [] if args.gradient_checkpointing else ["--no-gradient-checkpointing"]
    argv += [f"--set={override}" for override in args.set]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [line for line in done.stdout.splitlines() if line.startswith('{"config"')]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{name}: worker failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(lines[-1])


def print_table(rows: list[dict]) -> list[str]:
    full = next((r for r in rows if r["config"] == "full"), None)
    memory = "peak CUDA MB" if rows and rows[0]["peak_cuda_mb"] is not None else "training peak RSS MB"

    def ratio(row, key):
        return f"{row[key] / full[key]:.3f}x" if full and full[key] else "-"

    header = (f"| config | trainable params | % of total | {memory} | vs full | loading peak RSS MB | "
              "step s (median) | vs full | checkpoint MB | vs full |")
    print(header)
    print("|" + "---|" * 10)
    for r in rows:
        print(f"| {r['config']} | {r['trainable_params']:,} | {100 * r['trainable_params'] / r['total_params']:.3f} | "
              f"{r['peak_mb']:.0f} | {ratio(r, 'peak_mb')} | {r['load_peak_rss_mb']:.0f} | "
              f"{r['step_s_median']:.3f} | {ratio(r, 'step_s_median')} | {r['checkpoint_mb']:.2f} | "
              f"{ratio(r, 'checkpoint_mb')} |")
    verdicts = []
    for key, prefix, goal in GOALS:
        for r in rows:
            if full and r["config"].startswith(prefix + "_") and full[key]:
                value = r[key] / full[key]
                verdicts.append(f"{r['config']} {key} / full = {value:.3f} (goal <= {goal}): "
                                f"{'met' if value <= goal else 'NOT met'}")
    print("\n".join(verdicts))
    return verdicts


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="medsft-peft-bench-"))
    if args.worker:
        print(json.dumps(worker(args, args.worker, work)), flush=True)
        return 0
    rows = []
    for name in args.configs:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        rows.append(run_config(args, name, work))
    print_table(rows)
    for row in rows:
        print(json.dumps(row))
    if args.json_out:
        Path(args.json_out).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
