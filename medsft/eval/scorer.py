"""Score generated answers: honest per-item extraction (`extract.py`), format compliance (`format.py`), and
optionally HuatuoGPT-o1's optimistic rules (`compat.py`), into predictions and per-benchmark metrics."""

from __future__ import annotations

from collections import Counter
from typing import Optional, Sequence

from medsft.eval.benchmarks import EvalItem
from medsft.eval.compat import COMPAT_LABEL, huatuo_match_choice, huatuo_postprocess, huatuo_score
from medsft.eval.extract import METHODS, UNPARSED, extract_answer
from medsft.eval.format import check_format
from medsft.eval.report import accuracy_ci95


def score_items(
    items: Sequence[EvalItem],
    outputs: Sequence[str],
    *,
    new_tokens: Optional[Sequence[int]] = None,
    truncated: Optional[Sequence[bool]] = None,
    compat: bool = False,
) -> tuple[list[dict], dict]:
    """(predictions, metrics) for answers `outputs[i]` to `items[i]` (all of one benchmark, or mixed).

    metrics: n, n_correct, accuracy (correct / n; unparsed counts as wrong), accuracy_ci95 (its 95% Wilson
    score interval [lo, hi], `report.wilson_interval`), unparsed, unparsed_rate,
    format_compliance, mean_output_chars, mean_output_tokens (when new_tokens given), truncated_rate,
    extraction_methods {method: count}; with compat=True also `compat_huatuo` {accuracy, head, tail,
    n_scored, n_dropped_empty, label} computed with HuatuoGPT-o1's rules over the same outputs.
    """
    if len(items) != len(outputs):
        raise ValueError(f"{len(items)} items but {len(outputs)} outputs")
    preds = []
    methods: Counter = Counter()
    n_correct = n_compliant = 0
    for k, (item, out) in enumerate(zip(items, outputs)):
        out = out or ""
        ex = extract_answer(out, item.options, numeric=item.numeric)
        fc = check_format(out)
        correct = ex.answer is not None and ex.answer == item.gold
        n_correct += correct
        n_compliant += fc.compliant
        methods[ex.method] += 1
        pred = {
            "id": item.id,
            "benchmark": item.benchmark,
            "question": item.question,
            "options": item.options,
            "output": out,
            "extracted": ex.answer,
            "extraction_method": ex.method,
            "extraction_evidence": ex.evidence,
            "gold": item.gold,
            "correct": bool(correct),
            "format_compliant": fc.compliant,
            "format_reason": fc.reason,
        }
        if new_tokens is not None:
            pred["new_tokens"] = int(new_tokens[k])
        if truncated is not None:
            pred["truncated"] = bool(truncated[k])
        if item.meta:
            pred["meta"] = item.meta
        if compat:
            post = huatuo_postprocess(out)
            if post:
                ans, kind = huatuo_match_choice(post, item.options)
                pred["compat_huatuo"] = {"first": ans[0], "last": ans[1], "match_type": kind}
            else:
                pred["compat_huatuo"] = {"dropped_empty": True}
        preds.append(pred)
    n = len(items)
    metrics = {
        "n": n,
        "n_correct": n_correct,
        "accuracy": n_correct / n if n else 0.0,
        "accuracy_ci95": accuracy_ci95(n_correct, n),
        "unparsed": methods.get(UNPARSED, 0),
        "unparsed_rate": methods.get(UNPARSED, 0) / n if n else 0.0,
        "format_compliance": n_compliant / n if n else 0.0,
        "mean_output_chars": sum(len(o or "") for o in outputs) / n if n else 0.0,
        "extraction_methods": {m: methods[m] for m in METHODS if methods.get(m)},
    }
    if new_tokens is not None:
        metrics["mean_output_tokens"] = sum(new_tokens) / n if n else 0.0
    if truncated is not None:
        metrics["truncated_rate"] = sum(bool(t) for t in truncated) / n if n else 0.0
    if compat:
        records = [
            {"source": "all", "output": out or "", "options": item.options, "answer_idx": item.gold}
            for item, out in zip(items, outputs)
        ]
        row = huatuo_score(records).get("all") or {
            "n_scored": 0, "n_dropped_empty": 0, "head": 0.0, "tail": 0.0, "accuracy": 0.0, "label": COMPAT_LABEL,
        }
        metrics["compat_huatuo"] = {
            "label": COMPAT_LABEL,
            "accuracy": row["accuracy"],
            "head": row["head"],
            "tail": row["tail"],
            "n_scored": row["n_scored"],
            "n_dropped_empty": row["n_dropped_empty"],
        }
    return preds, metrics
