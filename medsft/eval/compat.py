"""HuatuoGPT-compat (optimistic) scorer: HuatuoGPT-o1's own rules, reproduced so users can compare with the
paper's numbers. NOT medsft's accuracy; every report labels it "HuatuoGPT-compat (optimistic)".

Reproduced from FreedomIntelligence/HuatuoGPT-o1 `evaluation/scorer.py` (`match_choice`, `score`) and
`evaluation/eval.py` (`postprocess_output` and the loop that drops empty predictions):

* Outputs go through `postprocess_output` (remove "</s>", drop ONE leading space); an output that is then
  empty is dropped from the benchmark entirely (neither numerator nor denominator).
* `match_choice(text, options)`:
  1. keep the text after the last "## Final Response\\n\\n" if present;
  2. r"(answer is\\s*?)([A-N])": first and last such letter (any of A..N, even beyond the options);
  3. a loose regex for a lone option letter between non-word characters (excluding "A " / "a ", the
     article), first and last match; this is what reads "I" from "I think" on 9+ option sets;
  4. option texts contained in the lowercased text: the option whose LAST occurrence is latest (the
     "last" answer) and, by a quirk of the original (`sorted(..., reverse=True)` on first occurrences),
     the option whose FIRST occurrence is latest (its "first" answer);
  5. otherwise force an answer: the option with the highest difflib similarity to the whole text
     (ties go to the later option).
* Per benchmark: head = accuracy of the first answers, tail = of the last answers, reported = max(head,
  tail), computed over the whole benchmark.
"""

from __future__ import annotations

import difflib
import re
from collections import OrderedDict

COMPAT_LABEL = "HuatuoGPT-compat (optimistic)"


def huatuo_postprocess(pred: str) -> str:
    """`postprocess_output` of HuatuoGPT-o1's eval.py."""
    pred = pred.replace("</s>", "")
    if len(pred) > 0 and pred[0] == " ":
        pred = pred[1:]
    return pred


def _str_similarity(a: str, b: str) -> float:
    return difflib.SequenceMatcher(None, a, b).ratio()


def _find_most_similar_index(str_list: list[str], target: str) -> int:
    best_index, best = None, 0.0
    for i, s in enumerate(str_list):
        sim = _str_similarity(s, target)
        if sim >= best:  # `>=`: ties go to the later option, as in the original
            best_index, best = i, sim
    return best_index


def huatuo_match_choice(text: str, options: dict[str, str]) -> tuple[list[str], int]:
    """([first, last], match_type) exactly as HuatuoGPT-o1's `match_choice` (type 1 regex, 2 text, 3 forced)."""
    if "## Final Response\n\n" in text:
        text = text.split("## Final Response\n\n")[-1]

    matches = list(re.finditer(r"(answer is\s*?)([A-N])", text, re.S))
    if matches:
        return [matches[0].group(2), matches[-1].group(2)], 1

    match_options = "ABCDEFGHIJKLMN"[: len(options)]
    matches = list(
        re.finditer(
            r"([\u4e00-\u9fff]|is |是|项|\*|\W|\ |\(|为|^|'|\"|#)(?![aA] )([" + match_options + r"])(\W|[\u4e00-\u9fff]|$)",
            text,
            re.S,
        )
    )
    if matches:
        return [matches[0].group(2), matches[-1].group(2)], 1

    text = text.lower()
    opsindex = [(opt, text.rindex(options[opt].lower())) for opt in options if options[opt].lower() in text]
    if len(opsindex) > 0:
        ans_last = sorted(opsindex, key=lambda x: x[1], reverse=True)[0][0]
        opsindex = [(opt, text.index(options[opt].lower())) for opt in options if options[opt].lower() in text]
        ans_first = sorted(opsindex, key=lambda x: x[1], reverse=True)[0][0]
        return [ans_first, ans_last], 2
    labels = list(options)
    ansindex = _find_most_similar_index([options[x].lower() for x in options], text.lower())
    return [labels[ansindex], labels[ansindex]], 3


def huatuo_score(records: list[dict]) -> dict:
    """Score records {source, output, options, answer_idx} the HuatuoGPT way.

    Returns {source: {accuracy, head, tail, n_scored, n_dropped_empty, n_correct_head, n_correct_tail}} in
    first-seen source order. `output` is the raw generation; HuatuoGPT's postprocess and empty-drop apply here.
    """
    res: "OrderedDict[str, dict]" = OrderedDict()
    for rec in records:
        src = rec.get("source", "unknown")
        row = res.setdefault(src, {"n_scored": 0, "n_dropped_empty": 0, "n_correct_head": 0, "n_correct_tail": 0})
        pred = huatuo_postprocess(rec["output"] or "")
        if len(pred) == 0:
            row["n_dropped_empty"] += 1
            continue
        ans, _ = huatuo_match_choice(pred, rec["options"])
        gold = str(rec["answer_idx"]).lower()
        row["n_correct_head"] += ans[0].lower() == gold
        row["n_correct_tail"] += ans[1].lower() == gold
        row["n_scored"] += 1
    for row in res.values():
        n = row["n_scored"]
        row["head"] = row["n_correct_head"] / n if n else 0.0
        row["tail"] = row["n_correct_tail"] / n if n else 0.0
        row["accuracy"] = max(row["head"], row["tail"])
        row["label"] = COMPAT_LABEL
    return dict(res)
