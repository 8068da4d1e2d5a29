"""Run an evaluation: load the model and the benchmarks, generate, score, write the report.

`evaluate_benchmark` is the in-process entry point the training loop uses for a generation eval at each
checkpoint (on the bare, unwrapped model); `run_evaluation` is what `medsft eval` runs.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from medsft.data.render import ensure_chat_template
from medsft.errors import ConfigError
from medsft.eval.benchmarks import Benchmark, EvalItem, load_benchmarks
from medsft.eval.compat import COMPAT_LABEL
from medsft.eval.generate import GenerationResult, generate_batch, generate_vllm, vllm_available
from medsft.eval.report import accuracy_ci95, append_predictions, render_markdown, write_summary
from medsft.eval.scorer import score_items
from medsft.models import is_adapter_dir, load_model_and_tokenizer, load_tokenizer, resolve_model_dir, torch_dtype

log = logging.getLogger(__name__)


def item_prompts(items: Sequence[EvalItem], eval_cfg: DictConfig) -> list[str]:
    return [it.prompt(eval_cfg.prompt_template) for it in items]


def generate_for_items(model: Any, tokenizer: Any, items: Sequence[EvalItem], eval_cfg: DictConfig,
                       desc: str = "eval") -> GenerationResult:
    """Answers to `items` with the transformers backend and the `eval` node's decoding settings."""
    return generate_batch(
        model,
        tokenizer,
        item_prompts(items, eval_cfg),
        max_new_tokens=int(eval_cfg.max_new_tokens),
        batch_size=int(eval_cfg.batch_size),
        system_prompt=eval_cfg.system_prompt,
        do_sample=bool(eval_cfg.do_sample),
        temperature=float(eval_cfg.temperature),
        top_p=float(eval_cfg.top_p),
        progress=bool(eval_cfg.progress),
        seed=eval_cfg.seed,
        desc=desc,
        repetition_penalty=float(eval_cfg.repetition_penalty),
    )


def evaluate_benchmark(model: Any, tokenizer: Any, items: Sequence[EvalItem], eval_cfg: DictConfig) -> dict:
    """Generate answers to `items` and return the summary metrics (no files written).

    For the training loop's generation eval: works on the bare model in-process (a wrapped model is
    unwrapped; train/eval mode is restored). `eval_cfg` is a composed `eval` node (medsft.eval.config).
    Returns n, accuracy, accuracy_ci95 (its 95% Wilson interval), n_correct, unparsed, unparsed_rate,
    format_compliance, mean_output_chars, mean_output_tokens, truncated_rate, extraction_methods, seconds,
    tokens_per_second (and compat_huatuo).
    """
    if not items:
        return {"n": 0, "accuracy": 0.0, "accuracy_ci95": accuracy_ci95(0, 0), "unparsed_rate": 0.0,
                "format_compliance": 0.0}
    gen = generate_for_items(model, tokenizer, items, eval_cfg)
    _, metrics = score_items(
        items, gen.texts, new_tokens=gen.new_tokens, truncated=gen.truncated, compat=bool(eval_cfg.compat_huatuo),
    )
    metrics["seconds"] = gen.seconds
    metrics["tokens_per_second"] = gen.tokens_per_second
    return metrics


# -------------------------------------------------------------------------------------------- medsft eval


def model_label(model_cfg: DictConfig) -> str:
    """A short name for output folders: model.name, or the checkpoint folder when model.path is one."""
    path = str(model_cfg.path or "")
    p = Path(path).expanduser()
    if path and p.is_dir():
        parts = p.resolve().parts
        label = "_".join(parts[-2:]) if len(parts) >= 2 else p.name
    else:
        label = str(model_cfg.name or "model")
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)


def eval_device(cfg_device: str) -> torch.device:
    if cfg_device == "cuda" or (cfg_device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("eval.device=cuda but no CUDA device is available; use eval.device=auto or cpu")
        return torch.device("cuda")
    return torch.device("cpu")


def load_for_eval(model_cfg: DictConfig, device: torch.device) -> tuple[Any, Any]:
    """(model on device, in eval mode; tokenizer with a chat template), embeddings resized if the template
    assignment added tokens."""
    model, tokenizer = load_model_and_tokenizer(model_cfg, dtype=torch_dtype(model_cfg.dtype, inference_device=device))
    ensure_chat_template(tokenizer)
    emb = model.get_input_embeddings()
    if emb is not None and len(tokenizer) > emb.num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    model.to(device)
    model.eval()
    return model, tokenizer


def _overall(per_bench: dict) -> dict:
    n = sum(m["n"] for m in per_bench.values())
    if not n:
        return {"n": 0}

    def wsum(key: str) -> float:
        return sum(m.get(key, 0.0) * m["n"] for m in per_bench.values()) / n

    n_correct = sum(m["n_correct"] for m in per_bench.values())
    return {
        "n": n,
        "n_correct": n_correct,
        "accuracy": wsum("accuracy"),
        "accuracy_ci95": accuracy_ci95(n_correct, n),
        "unparsed": sum(m["unparsed"] for m in per_bench.values()),
        "unparsed_rate": wsum("unparsed_rate"),
        "format_compliance": wsum("format_compliance"),
        "mean_output_chars": wsum("mean_output_chars"),
        "mean_output_tokens": wsum("mean_output_tokens"),
        "truncated_rate": wsum("truncated_rate"),
    }


def run_evaluation(cfg: DictConfig, out_dir: Optional[str | Path] = None) -> Path:
    """`medsft eval`: the composed config (model + eval) -> output folder with the three files."""
    e = cfg.eval
    benches: list[Benchmark] = load_benchmarks(e)  # before the model: a missing file fails fast
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    out = Path(out_dir or e.output_dir or Path("outputs") / "eval" / model_label(cfg.model) / stamp)
    out.mkdir(parents=True, exist_ok=True)
    pred_path = out / "predictions.jsonl"
    pred_path.write_text("", encoding="utf-8")

    device = eval_device(e.device)
    t0 = time.perf_counter()
    if e.backend == "vllm":
        if is_adapter_dir(resolve_model_dir(cfg.model.path, cfg.model.cache_dir, cfg.model.tiny)):
            raise ConfigError(f"eval.backend=vllm: model.path={cfg.model.path} is an adapter checkpoint; merge it "
                              "first (`medsft merge <checkpoint> --out DIR`, then model.path=DIR) or use "
                              "eval.backend=transformers, which loads base + adapter")
        if not vllm_available():
            raise ConfigError(
                "eval.backend=vllm needs the vllm package (`pip install vllm`, CUDA GPU), which is not installed; "
                "use eval.backend=transformers"
            )
        model = None
        tokenizer = load_tokenizer(cfg.model)
        ensure_chat_template(tokenizer)
        model_dir = resolve_model_dir(cfg.model.path, cfg.model.cache_dir, cfg.model.tiny)
    else:
        model, tokenizer = load_for_eval(cfg.model, device)
    load_seconds = time.perf_counter() - t0
    log.info("model loaded in %.1f s on %s", load_seconds, device)

    per_bench: dict[str, dict] = {}
    for bench in benches:
        if e.backend == "vllm":
            gen = generate_vllm(
                model_dir, tokenizer, item_prompts(bench.items, e), e.max_new_tokens, e.system_prompt, e.do_sample,
                e.temperature, e.top_p, e.seed, dtype=str(cfg.model.dtype), **OmegaConf.to_container(e.vllm),
                repetition_penalty=e.repetition_penalty,
            )
        else:
            gen = generate_for_items(model, tokenizer, bench.items, e, desc=bench.name)
        preds, metrics = score_items(
            bench.items, gen.texts, new_tokens=gen.new_tokens, truncated=gen.truncated, compat=e.compat_huatuo
        )
        append_predictions(pred_path, preds)
        metrics.update(
            {
                "source": bench.source,
                "language": bench.language,
                "n_in_file": bench.n_total,
                "skipped": bench.skipped,
                "notes": bench.notes,
                "generation_seconds": round(gen.seconds, 2),
                "tokens_per_second": round(gen.tokens_per_second, 2),
            }
        )
        per_bench[bench.name] = metrics
        log.info("%s: n=%d accuracy=%.3f unparsed=%.3f format=%.3f", bench.name, metrics["n"], metrics["accuracy"],
                 metrics["unparsed_rate"], metrics["format_compliance"])  # fmt: skip

    summary = {
        "created": datetime.now().isoformat(timespec="seconds"),
        "scorer": "medsft honest scorer (medsft/eval/extract.py): unparsed answers count as wrong",
        "compat_label": COMPAT_LABEL if e.compat_huatuo else None,
        "model": {"label": model_label(cfg.model), "name": cfg.model.name, "path": cfg.model.path,
                  "device": str(device), "load_seconds": round(load_seconds, 2)},  # fmt: skip
        "generation": {
            "backend": e.backend, "do_sample": e.do_sample, "temperature": e.temperature, "top_p": e.top_p,
            "max_new_tokens": e.max_new_tokens, "batch_size": e.batch_size, "seed": e.seed,
            "repetition_penalty": e.repetition_penalty,
        },  # fmt: skip
        "eval": OmegaConf.to_container(e, resolve=True),
        "benchmarks": per_bench,
        "overall": _overall(per_bench),
        "total_seconds": round(time.perf_counter() - t0, 2),
    }
    write_summary(out, summary)
    return out


def print_summary(out_dir: Path) -> None:
    summary = json.loads((out_dir / "summary.json").read_text(encoding="utf-8"))
    print(render_markdown(summary))


def load_preset_items(eval_cfg: DictConfig) -> list[EvalItem]:
    """Items of a composed `eval` node's benchmarks (all concatenated, eval.limit per benchmark, seeded): what
    the training loop feeds `evaluate_benchmark` for a small generation eval per checkpoint.

        eval_cfg = compose_eval_config(["eval=headqa_es", "eval.limit=50", "eval.max_new_tokens=512"]).eval
        metrics = evaluate_benchmark(model, tokenizer, load_preset_items(eval_cfg), eval_cfg)
    """
    return [it for bench in load_benchmarks(eval_cfg) for it in bench.items]
