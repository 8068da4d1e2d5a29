"""Before/after answers to held-out questions: the demo's visible proof that fine-tuning worked.

Generation and format compliance are the evaluation module's (the same code `medsft eval` scores with). Under
ZeRO-3 (sharded weights) the answers come from a worker process on the folder that holds the weights: the base
model before training, the final checkpoint after it (medsft.eval.worker). A run that trains in bf16 autocast
answers with a bf16 copy of its weights, as `medsft eval` of its checkpoint would (1.4x faster greedy decoding
than autocast on the CPU demo: 88 vs 125 ms a token for 11 questions).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import logging
import re
import shutil
import textwrap

import torch
from omegaconf import OmegaConf

from medsft.eval.format import check_format
from medsft.eval.generate import generate_responses, summarize_generations
from medsft.eval.language import answer_language
from medsft.eval.report import decoding_label
from medsft.eval.worker import run_worker
from medsft.runtime.fsdp import is_fsdp
from medsft.train import checkpoint as ckpt

log = logging.getLogger("medsft.generation_check")


def sharded_weights(cfg) -> bool:
    """ZeRO-3: no process holds the whole model, so generation runs in a worker on a saved folder."""
    return bool(cfg.deepspeed.enabled and cfg.deepspeed.zero_stage == 3)


def weights_on_disk(ctx) -> dict | None:
    """The `model` node of a folder holding the weights the model has now: the base model before the first
    step, else the complete checkpoint of this step (the one resumed from, or just saved); None when there is
    none (e.g. checkpoint.save_final=false)."""
    step = ctx.state.global_step
    if step == 0:
        return OmegaConf.to_container(ctx.cfg.model, resolve=True)
    for path in reversed(ckpt.list_complete_checkpoints(ctx.ckpt_root)):
        if ckpt.checkpoint_step(path) == step:
            return {**OmegaConf.to_container(ctx.cfg.model, resolve=True), "path": str(path), "name": path.name}
    return None


def bf16_inference_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` with bf16 parameters for generation; buffers (e.g. RoPE frequencies) are shared, not
    cast, and the fp32 training weights stay untouched. Tied parameters stay tied (one copy per parameter)."""
    memo = {id(p): torch.nn.Parameter(p.detach().to(torch.bfloat16), requires_grad=False)
            for p in model.parameters()}
    memo.update({id(b): b for b in model.buffers()})
    clone = copy.deepcopy(model, memo)
    # accelerate's bf16 wrapper on the instance's forward (autocast + fp32 outputs) would undo the point
    for attr in ("forward", "_original_forward"):
        clone.__dict__.pop(attr, None)
    for module in clone.modules():  # model.compile=true: compiled for training's shapes and dtype; eager here
        module._compiled_call_impl = None
    clone.eval()
    return clone


def _answers_here(ctx, questions: list[str]) -> list[str]:
    cfg = ctx.cfg
    model = ctx.accelerator.unwrap_model(ctx.model)
    was_training = model.training
    model.eval()
    # bf16 autocast on one whole model: generate from bf16 weights (as `medsft eval` does: faster than autocast,
    # which keeps norms and residuals in fp32 and casts every activation). Sharded models (FSDP2, DeepSpeed)
    # keep autocast: their parameters cannot be copied whole here.
    plain = not is_fsdp(ctx.accelerator) and not cfg.deepspeed.enabled
    bf16_copy = plain and ctx.accelerator.mixed_precision == "bf16"
    answerer = bf16_inference_copy(model) if bf16_copy else model
    with contextlib.nullcontext() if bf16_copy else ctx.accelerator.autocast():
        texts = generate_responses(
            answerer, ctx.tokenizer, questions,
            max_new_tokens=cfg.generation_check.max_new_tokens,
            batch_size=cfg.generation_check.batch_size,
            system_prompt=cfg.data.system_prompt,
            progress=cfg.logging.progress_bar and ctx.accelerator.is_main_process,
            repetition_penalty=cfg.generation_check.repetition_penalty,
        )
    if was_training:
        model.train()
    return texts


def _answers_in_worker(ctx, questions: list[str], model_node: dict) -> list[str] | None:
    gc_cfg = ctx.cfg.generation_check
    try:
        return run_worker({"task": "answers", "model": model_node, "questions": questions,
                           "max_new_tokens": gc_cfg.max_new_tokens, "batch_size": gc_cfg.batch_size,
                           "system_prompt": ctx.cfg.data.system_prompt,
                           "repetition_penalty": gc_cfg.repetition_penalty})["texts"]
    except (RuntimeError, OSError, KeyError, ValueError) as err:  # a side check never stops training
        log.warning("generation check skipped: %s", err)
        return None


@torch.no_grad()
def run_generation_check(ctx, when: str) -> dict | None:
    """Greedy answers to the first held-out questions, on the main process; every process waits. Under ZeRO-3
    the answers come from a worker process on the folder holding the current weights (medsft.eval.worker); under
    FSDP2 every process generates the same answers in lockstep (each forward gathers the sharded weights: a
    collective), and the main process reports them."""
    accelerator, cfg = ctx.accelerator, ctx.cfg
    records = ctx.data.val_records[: cfg.generation_check.num_questions]
    questions = [r.question for r in records]
    sharded = sharded_weights(cfg)
    model_node = weights_on_disk(ctx) if sharded else None
    if sharded and model_node is None:
        if accelerator.is_main_process:
            log.warning("generation check %s training skipped: under ZeRO-3 it runs on a saved folder, and no "
                        "checkpoint holds step %d (checkpoint.save_final=false?)", when, ctx.state.global_step)
        accelerator.wait_for_everyone()
        return None
    result, texts = None, None
    if sharded:
        if accelerator.is_main_process:
            log.info("generation check %s training: ZeRO-3 shards the weights, so a separate process answers "
                     "from %s", when, model_node["path"])
            texts = _answers_in_worker(ctx, questions, model_node)
    elif accelerator.is_main_process or is_fsdp(accelerator):
        texts = _answers_here(ctx, questions)
    if accelerator.is_main_process and texts is not None:
        result = _report(ctx, when, records, texts)
    accelerator.wait_for_everyone()
    return result


def _report(ctx, when: str, records, texts: list[str]) -> dict:
    """Files, metrics, the log line and (after training) the side-by-side of the generation check's answers."""
    cfg = ctx.cfg
    summary = summarize_generations(texts)
    result = {"format_compliance": summary["format_compliance"], "n_compliant": summary["n_compliant"],
              "mean_chars": summary["mean_chars"], "n": summary["n"], "n_spanish": summary["n_spanish"],
              "texts": texts}
    with (ctx.run_dir / f"generations_{when}.jsonl").open("w", encoding="utf-8") as handle:
        for record, text in zip(records, texts):
            handle.write(json.dumps({"index": record.index, "question": record.question, "answer": text,
                                     "compliant": check_format(text).compliant,
                                     "language": answer_language(text)}, ensure_ascii=False) + "\n")
    figures = {"kind": "generation", "when": when, "step": ctx.state.global_step,
               "format_compliance": result["format_compliance"], "mean_answer_chars": result["mean_chars"],
               "n_questions": result["n"], "n_compliant": result["n_compliant"],
               "n_spanish": result["n_spanish"], "repetition_penalty": cfg.generation_check.repetition_penalty}
    ctx.metrics.write(figures)
    ctx.tracker.log({f"gen/{when}/format_compliance": result["format_compliance"],
                     f"gen/{when}/mean_answer_chars": result["mean_chars"]}, step=ctx.state.global_step)
    log.info("%s training: format compliance %.0f%% (%d/%d held-out questions, %s), answers in Spanish %d/%d, "
             "mean answer %d chars", when, 100 * result["format_compliance"], result["n_compliant"], result["n"],
             decoding_label({"repetition_penalty": cfg.generation_check.repetition_penalty}),
             result["n_spanish"], result["n"], result["mean_chars"])
    if when == "before":
        ctx.generation_before = result
    else:
        before = ctx.generation_before
        if before:
            print(side_by_side(records[0].question, before["texts"][0], texts[0], cfg.generation_check.show_chars),
                  flush=True)
    return result


# How whitespace is shown in the side-by-side: an answer of 384 newlines is 384 characters, not an empty answer.
WHITESPACE_SIGNS = {"\n": "⏎", " ": "·", "\t": "→", "\r": "␍"}
_BLANK_RUN = re.compile(r"\n{3,}")


def whitespace_runs(text: str) -> str:
    """`⏎×380 ·×4`: a run of whitespace, each character made visible and counted."""
    parts = []
    for char, group in itertools.groupby(text):
        n = len(list(group))
        sign = WHITESPACE_SIGNS.get(char, repr(char))
        parts.append(sign if n == 1 else f"{sign}×{n}")
    return " ".join(parts)


def shown_answer(text: str, max_chars: int) -> str:
    """What was generated, as it will be printed: whitespace-only answers described character by character,
    leading/trailing whitespace and runs of blank lines made visible, the rest cut to max_chars (the number
    of characters left out is said)."""
    if not text:
        return "(empty answer: no characters)"
    if not text.strip():
        return f"(whitespace only, {len(text)} characters: {whitespace_runs(text)})"
    body = text.strip()
    lead, trail = text[: len(text) - len(text.lstrip())], text[len(text.rstrip()) :]
    if len(body) > max_chars:
        body = body[:max_chars].rstrip() + f" [... {len(text.strip()) - max_chars} more characters]"
    body = _BLANK_RUN.sub(lambda m: f"\n[{whitespace_runs(m.group())}]\n", body)
    return (f"[{whitespace_runs(lead)}] " if lead else "") + body + (f" [{whitespace_runs(trail)}]" if trail else "")


def side_by_side(question: str, before: str, after: str, max_chars: int) -> str:
    """Two columns (base model | fine-tuned), each headed by its exact length in characters (the length the
    summary's mean counts) and showing what was generated (`shown_answer`)."""
    width = max(80, min(shutil.get_terminal_size((120, 20)).columns, 160))
    column = (width - 3) // 2

    def wrap(text: str) -> list[str]:
        lines = []
        for paragraph in shown_answer(text, max_chars).splitlines() or [""]:
            lines.extend(textwrap.wrap(paragraph, column) or [""])
        return lines

    left, right = wrap(before), wrap(after)
    rows = [f"{a:<{column}} | {b}" for a, b in itertools.zip_longest(left, right, fillvalue="")]
    header = f"{f'BASE MODEL (before): {len(before)} characters':<{column}} | FINE-TUNED (after): {len(after)} characters"
    rule = "-" * width
    question_lines = textwrap.wrap("Held-out question: " + question, width)
    return "\n".join(["", rule, *question_lines, rule, header, rule, *rows, rule])
