"""Benchmark loaders: small fixtures always; the real shared files (counts as in their README) when present."""

import json
import os
import re
from pathlib import Path

import pytest

import medsft
from medsft.errors import ConfigError, DataError
from medsft.eval.benchmarks import (
    HUATUO_O1_BENCHMARKS,
    derive_casimedicos_gold,
    load_casimedicos,
    load_headqa,
    load_huatuo_format,
    load_huatuo_o1,
    split_casimedicos_question,
)

FIX = Path(__file__).parent / "fixtures" / "eval"


def shared_data() -> Path:
    env = os.environ.get("MEDSFT_SHARED_DATA")
    return Path(env) if env else Path(medsft.__file__).resolve().parents[1].parent / "shared" / "data"


def need_shared(sub: str) -> Path:
    p = shared_data() / sub
    if not p.exists():
        pytest.skip(f"shared benchmark data not found at {p} (set MEDSFT_SHARED_DATA to the shared/data folder)")
    return p


# ------------------------------------------------------------------------------------------- fixtures


def test_huatuo_format_fixture():
    (bench,) = load_huatuo_format(FIX / "mini_mcq.json", language="es")
    assert bench.name == "mini_mcq" and len(bench.items) == 10 and bench.n_total == 10
    golds = [it.gold for it in bench.items]
    assert golds == ["C", "B", "D", "A", "B", "B", "C", "B", "D", "A"]  # int answer_idx, list options, answer text
    it = bench.items[4]
    assert list(it.options) == list("ABCDE") and it.options["B"] == "Tráquea"
    assert it.prompt().startswith("Responde a la siguiente pregunta de opción múltiple:\n")
    assert "\nB. Tráquea\n" in it.prompt()
    # limit: a seeded subset in file order, or the first N
    (sub,) = load_huatuo_format(FIX / "mini_mcq.json", limit=3, seed=1)
    assert len(sub.items) == 3 and [int(i.id.split("/")[1]) for i in sub.items] == sorted(int(i.id.split("/")[1]) for i in sub.items)
    (first,) = load_huatuo_format(FIX / "mini_mcq.json", limit=3, seed=None)
    assert [i.id for i in first.items] == ["mini_mcq/0", "mini_mcq/1", "mini_mcq/2"]


def test_huatuo_format_errors(tmp_path):
    with pytest.raises(DataError, match="eval data not found: .*nope.json"):
        load_huatuo_format(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"question": "q", "options": {"A": "x", "B": "y"}, "answer_idx": "E"}]))
    with pytest.raises(DataError, match=r"bad.json\[bad\]\[0\]: answer_idx='E'"):
        load_huatuo_format(bad)
    grouped = tmp_path / "g.json"
    grouped.write_text(json.dumps({"s1": [{"question": "q", "options": ["x", "y"], "answer_idx": "A"}]}))
    with pytest.raises(ConfigError, match="not in g.json"):
        load_huatuo_format(grouped, subsets=["s2"])
    jl = tmp_path / "u.jsonl"
    jl.write_text('{"question": "q", "options": ["x", "y"], "answer": "y"}\n')
    assert load_huatuo_format(jl)[0].items[0].gold == "B"


def test_headqa_fixture():
    (bench,) = load_headqa(FIX / "headqa_mini", ["test"])
    assert bench.name == "headqa_es_test" and bench.n_total == 3
    assert bench.skipped == {"has image": 1}
    q1, q7 = bench.items
    assert q1.gold == "C" and q1.numeric and q1.language == "es" and list(q1.options) == list("ABCDE")
    # answers listed out of aid order are sorted by aid; ra "2" (a string) -> the aid-2 answer -> B
    assert q7.options["A"] == "Norton." and q7.options["B"] == "Glasgow." and q7.gold == "B"
    (with_img,) = load_headqa(FIX / "headqa_mini", ["test"], skip_images=False)
    assert len(with_img.items) == 3 and with_img.skipped == {}
    (med,) = load_headqa(FIX / "headqa_mini", ["test"], categories=["medicine"])
    assert len(med.items) == 1 and med.skipped == {"has image": 1, "category filtered": 1}
    with pytest.raises(DataError, match="dev_HEAD.json not found"):
        load_headqa(FIX / "headqa_mini", ["dev"])


def test_casimedicos_fixture():
    (bench,) = load_casimedicos(FIX / "casimedicos_mini", ["test"])
    assert bench.n_total == 4
    assert bench.skipped == {"duplicate question (merged)": 1, "gold not derivable": 1}
    pneumonia, amox = bench.items
    assert pneumonia.gold == "B" and pneumonia.meta["derivation"] == "explicit"
    assert pneumonia.meta["source_ids"] == ["901", "902"]
    assert pneumonia.question.startswith("Varón de 40 años") and pneumonia.question.endswith("más probable?")
    assert "correcta" not in pneumonia.question  # the explanation is not in the prompt
    assert amox.gold == "B" and amox.meta["derivation"] == "option_text"


def test_casimedicos_derivation_rules():
    stem, opts = split_casimedicos_question("Cuál es el tratamiento?: Uno. @@ Dos cosas. @@ Tres. @@ Cuatro.")
    assert stem == "Cuál es el tratamiento?" and opts == ["Uno.", "Dos cosas.", "Tres.", "Cuatro."]
    stem, opts = split_casimedicos_question("Señale la respuesta FALSA: Primera. @@ Segunda.")
    assert stem == "Señale la respuesta FALSA:" and opts == ["Primera.", "Segunda."]
    o = ["Amiloidosis.", "Nefropatía IgA.", "Síndrome de Alport.", "Nefropatía con cambios mínimos."]
    assert derive_casimedicos_gold("... sugieren una nefropatía con cambios mínimos, que ...", o) == (4, "option_text")
    assert derive_casimedicos_gold("Es la típica (opción 3 correcta).", o) == (3, "explicit")
    assert derive_casimedicos_gold("Por tanto la respuesta correcta es la 1.", o) == (1, "explicit")
    assert derive_casimedicos_gold("La respuesta es la 2, sin duda.", o) == (2, "explicit")
    # "respuesta 3 incorrecta" never names the answer of a positive question
    assert derive_casimedicos_gold("Quitando esa (respuesta 3 incorrecta), queda la duda.", o)[0] is None
    # ... but "la respuesta 2 es la falsa" does for a FALSA question
    assert derive_casimedicos_gold("la respuesta 2 es la falsa y la que habría que marcar", o, "Indique la FALSA:") == (2, "explicit")
    # two different numbers: not derivable rather than a guess
    assert derive_casimedicos_gold("opción 1 correcta ... opción 2 correcta", o)[0] is None
    assert derive_casimedicos_gold("Eleva gonadotropina coriónica.", o)[0] is None


# ------------------------------------------------------------------------------------------ shared data


def test_huatuo_o1_counts():
    path = need_shared("huatuo_o1/eval_data.json")
    benches = load_huatuo_o1(path)
    counts = {b.name: len(b.items) for b in benches}
    assert counts == {
        "MedMCQA_validation": 4183,
        "MedQA_USLME_test": 1273,
        "PubMedQA_test": 1000,
        "MMLU-Pro_Medical_test": 1535,
        "GPQA_Medical_test": 390,
    }
    assert tuple(counts) == HUATUO_O1_BENCHMARKS
    by = {b.name: b for b in benches}
    assert all(it.options == {"A": "yes", "B": "no", "C": "maybe"} for it in by["PubMedQA_test"].items)
    mmlu = by["MMLU-Pro_Medical_test"].items
    assert max(len(it.options) for it in mmlu) == 10 and any(it.gold == "J" for it in mmlu)
    assert all(it.gold in it.options for b in benches for it in b.items)
    sub = load_huatuo_o1(path, subsets=["PubMedQA_test"], limit=20)
    assert [b.name for b in sub] == ["PubMedQA_test"] and len(sub[0].items) == 20


def test_headqa_counts():
    root = need_shared("headqa_es")
    benches = load_headqa(root, ["train", "dev", "test"])
    assert [b.n_total for b in benches] == [2657, 1366, 2742]
    images = [b.skipped.get("has image", 0) for b in benches]
    assert sum(images) == 165  # README: 165 questions reference images
    assert [len(b.items) for b in benches] == [b.n_total - i for b, i in zip(benches, images)]
    assert all(it.gold in it.options and it.numeric for b in benches for it in b.items)
    assert {len(it.options) for it in benches[0].items} == {5} and {len(it.options) for it in benches[2].items} == {4}


def test_casimedicos_counts():
    root = need_shared("casimedicos_es")
    dev, test = load_casimedicos(root, ["dev", "test"])
    assert (dev.n_total, test.n_total) == (88, 87)
    for b in (dev, test):
        accounted = len(b.items) + sum(b.skipped.values())
        assert accounted == b.n_total  # every record is used or counted as skipped with a reason
        assert all(it.gold in it.options for it in b.items)
        # the explanation does not leak into the prompt through option numbers
        assert not any(re.search(r"\b(?:opci[oó]n|respuesta)\s+\d", it.question, re.I) for it in b.items)
    # derived for most distinct questions (88 usable of 147 distinct when written; guard against collapse)
    assert len(dev.items) + len(test.items) >= 75
