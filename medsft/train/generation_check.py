"""Before/after answers to held-out questions: the demo's visible proof that fine-tuning worked.

Generation and format compliance are the evaluation module's (the same code `medsft eval` scores with).
"""

from __future__ import annotations

import itertools
import json
import logging
import shutil
import textwrap

import torch

from medsft.eval.format import check_format
from medsft.eval.generate import generate_responses, summarize_generations
from medsft.eval.language import answer_language
from medsft.eval.report import decoding_label

log = logging.getLogger("medsft.generation_check")


@torch.no_grad()
def run_generation_check(ctx, when: str) -> dict | None:
    """Greedy answers to the first held-out questions, on the main process; every process waits."""
    accelerator, cfg = ctx.accelerator, ctx.cfg
    if cfg.deepspeed.enabled and cfg.deepspeed.zero_stage == 3:
        log.info("generation check skipped under ZeRO-3 (sharded weights); run `medsft eval` on the checkpoint")
        return None
    records = ctx.data.val_records[: cfg.generation_check.num_questions]
    result = None
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(ctx.model)
        was_training = model.training
        model.eval()
        with accelerator.autocast():  # the training precision: bf16 where the run trains in bf16
            texts = generate_responses(
                model, ctx.tokenizer, [r.question for r in records],
                max_new_tokens=cfg.generation_check.max_new_tokens,
                batch_size=cfg.generation_check.batch_size,
                system_prompt=cfg.data.system_prompt,
                progress=cfg.logging.progress_bar,
                repetition_penalty=cfg.generation_check.repetition_penalty,
            )
        if was_training:
            model.train()
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
    accelerator.wait_for_everyone()
    return result


def side_by_side(question: str, before: str, after: str, max_chars: int) -> str:
    """Two columns (base model | fine-tuned), each answer cut to max_chars."""
    width = max(80, min(shutil.get_terminal_size((120, 20)).columns, 160))
    column = (width - 3) // 2

    def cut(text: str) -> str:
        text = text.strip()
        if not text:
            return "(empty answer)"
        return text if len(text) <= max_chars else text[:max_chars].rstrip() + " [...]"

    def wrap(text: str) -> list[str]:
        lines = []
        for paragraph in cut(text).splitlines() or [""]:
            lines.extend(textwrap.wrap(paragraph, column) or [""])
        return lines

    left, right = wrap(before), wrap(after)
    rows = [f"{a:<{column}} | {b}" for a, b in itertools.zip_longest(left, right, fillvalue="")]
    header = f"{'BASE MODEL (before)':<{column}} | FINE-TUNED (after)"
    rule = "-" * width
    question_lines = textwrap.wrap("Held-out question: " + question, width)
    return "\n".join(["", rule, *question_lines, rule, header, rule, *rows, rule])
