"""HuatuoGPT-compat (optimistic) scorer == a hand computation of HuatuoGPT-o1's rules; honest scorer differs."""

import pytest

from medsft.eval.benchmarks import EvalItem
from medsft.eval.compat import COMPAT_LABEL, huatuo_match_choice, huatuo_postprocess, huatuo_score
from medsft.eval.scorer import score_items

OPT4 = {"A": "Fibronectin", "B": "Collagen", "C": "Integrins", "D": "Proteoglycans"}
OPT10 = {k: f"choice {k}{k}" for k in "ABCDEFGHIJ"}

# (benchmark, options, gold, output, HuatuoGPT's [first, last] or None if dropped, match type, honest answer)
CASES = [
    # "answer is" regex: first A, last C -> head wrong, tail right
    ("b4", OPT4, "C", "The answer is A. Actually the answer is C.", ["A", "C"], 1, "C"),
    # no letter: option text found -> B (type 2)
    ("b4", OPT4, "B", "collagen fibres", ["B", "B"], 2, "B"),
    # nothing at all: forced by difflib similarity; all ratios 0 -> the LAST option wins the `>=` tie -> D
    ("b4", OPT4, "D", "xyz", ["D", "D"], 3, None),
    # empty after postprocess (one leading space removed, "</s>" removed): dropped
    ("b4", OPT4, "A", " ", None, None, None),
    ("b4", OPT4, "A", "</s>", None, None, None),
    # lone letter at the start
    ("b4", OPT4, "A", "A. Fibronectin", ["A", "A"], 1, "A"),
    # only the text after the last "## Final Response\n\n" counts
    ("b4", OPT4, "B", "## Thinking\n\nThe answer is D\n\n## Final Response\n\nB", ["B", "B"], 1, "B"),
    # the "I think" trap on 10 options: first letter read is I, last is B
    ("mmlu", OPT10, "B", "I think it's B", ["I", "B"], 1, None),
    ("mmlu", OPT10, "J", "The answer is J", ["J", "J"], 1, "J"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[3][:24] for c in CASES])
def test_match_choice_per_output(case):
    _, options, _, output, expected, kind, _ = case
    text = huatuo_postprocess(output)
    if expected is None:
        assert text == ""
        return
    assert huatuo_match_choice(text, options) == (expected, kind)


def test_benchmark_scores_equal_hand_computation():
    records = [{"source": b, "options": o, "answer_idx": g, "output": out} for b, o, g, out, *_ in CASES]
    res = huatuo_score(records)
    # b4: scored 5 (2 dropped); head: A!=C, B, D, A, B -> 4/5; tail: C, B, D, A, B -> 5/5; reported max = 1.0
    assert res["b4"]["n_scored"] == 5 and res["b4"]["n_dropped_empty"] == 2
    assert res["b4"]["head"] == pytest.approx(0.8) and res["b4"]["tail"] == pytest.approx(1.0)
    assert res["b4"]["accuracy"] == pytest.approx(1.0)
    # mmlu: head I!=B, J -> 1/2; tail B, J -> 2/2 -> 1.0
    assert res["mmlu"]["head"] == pytest.approx(0.5) and res["mmlu"]["accuracy"] == pytest.approx(1.0)
    assert res["b4"]["label"] == COMPAT_LABEL


def test_honest_scorer_on_the_same_outputs():
    for bench in ("b4", "mmlu"):
        cases = [c for c in CASES if c[0] == bench]
        items = [EvalItem(f"{bench}/{i}", bench, "q", c[1], c[2]) for i, c in enumerate(cases)]
        preds, m = score_items(items, [c[3] for c in cases], compat=True)
        assert [p["extracted"] for p in preds] == [c[6] for c in cases]
        honest = sum(c[6] == c[2] for c in cases) / len(cases)
        assert m["accuracy"] == pytest.approx(honest)
        assert m["compat_huatuo"]["accuracy"] == pytest.approx(1.0)
        assert m["compat_huatuo"]["label"] == COMPAT_LABEL
    # b4 honest: 4/7 (the forced "xyz" and the two empty outputs count as wrong, not dropped)
    b4 = [c for c in CASES if c[0] == "b4"]
    _, m = score_items([EvalItem(str(i), "b4", "q", c[1], c[2]) for i, c in enumerate(b4)], [c[3] for c in b4])
    assert m["n"] == 7 and m["n_correct"] == 4 and m["unparsed"] == 3
    assert "compat_huatuo" not in m
