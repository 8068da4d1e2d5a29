"""RL data: field mapping (Spanish default, HuatuoGPT English preset), MCQ -> verifiable question, validation
errors naming file / record / field, the seeded eval split, and prompts rendered exactly as in SFT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medsft.errors import DataError
from medsft.rl.data import (
    filter_long_prompts,
    load_questions,
    load_rl_data,
    mcq_to_question,
    split_eval,
    to_dataset,
)

ROOT = Path(__file__).resolve().parents[1]
FIX = Path(__file__).parent / "fixtures" / "rl"
DEMO = ROOT / "data" / "rl_demo_data.json"
HUATUO_DEMO = ROOT.parent / "shared" / "data" / "huatuo_o1" / "demo_data.json"


def test_bundled_spanish_demo_loads_with_the_default_fields(rl_data_config):
    data = load_rl_data(rl_data_config(path=str(DEMO), eval_ratio=0.1, eval_max=200), seed=42)
    assert data.total == len(json.loads(DEMO.read_text(encoding="utf-8"))) >= 24
    assert data.kinds["open"] >= 20 and data.kinds.get("mcq", 0) >= 1
    assert len(data.eval) == int(data.total * 0.1) and len(data.train) + len(data.eval) == data.total
    first = data.train[0] if data.train[0].index == 0 else next(q for q in data.eval if q.index == 0)
    assert first.kind == "open" and first.reference == "Enfermedad de Graves"
    mcq = next(q for q in data.train + data.eval if q.kind == "mcq")
    assert mcq.question.startswith("Responde a la siguiente pregunta de opción múltiple:\n")
    assert mcq.reference == f"{mcq.gold}. {mcq.options[mcq.gold]}"
    assert "\nA. " in mcq.question and f"\n{mcq.gold}. {mcq.options[mcq.gold]}" in mcq.question


def test_seeded_split_is_reproducible_and_seed_dependent():
    items = list(range(100))
    train, held = split_eval(items, 0.1, 200, seed=1)
    assert (train, held) == split_eval(items, 0.1, 200, seed=1)
    assert held != split_eval(items, 0.1, 200, seed=2)[1]
    assert len(held) == 10 and sorted(train + held) == items and held == sorted(held)
    assert len(split_eval(items, 0.5, 7, seed=1)[1]) == 7  # HuatuoGPT-o1's cap (eval_max)
    assert split_eval(items, 0.0, 200, seed=1) == (items, [])


@pytest.mark.skipif(not HUATUO_DEMO.is_file(), reason="../shared/data/huatuo_o1/demo_data.json not present")
def test_huatuo_english_preset_fields_and_mcq_view_of_the_same_file(rl_data_config):
    fields = {"question": "Open-ended Verifiable Question", "answer": "Ground-True Answer"}
    questions, bad, total = load_questions(HUATUO_DEMO, rl_data_config(fields=fields))
    assert total == len(questions) == 198 and not bad
    assert questions[0].kind == "open" and questions[0].reference == "Parvovirus B19 infection"
    mcq, _, _ = load_questions(HUATUO_DEMO, rl_data_config(kind="mcq", language="en"))
    assert mcq[0].gold == "D" and mcq[0].reference == "D. Parvovirus B19 infection"
    assert mcq[0].question.startswith("Please answer the following multiple-choice question:\n")
    assert mcq[0].question.endswith("\nE. Vitamin B12 deficiency")


def test_mcq_jsonl_records_become_verifiable_questions(rl_data_config):
    questions, bad, total = load_questions(FIX / "mcq_en.jsonl", rl_data_config(kind="auto", language="en"))
    assert total == 3 and not bad
    assert [q.gold for q in questions] == ["B", "C", "A"]
    assert questions[0].line == 1 and questions[0].reference == "B. Vitamin C"


def test_mcq_to_question_uses_the_eval_prompt():
    from medsft.eval.benchmarks import PROMPT_TEMPLATES, EvalItem

    options = {"A": "Húmero", "B": "Fémur"}
    prompt, reference = mcq_to_question("¿Hueso más largo?", options, "B", "es")
    item = EvalItem("x", "b", "¿Hueso más largo?", options, "B", language="es")
    assert prompt == item.prompt(PROMPT_TEMPLATES["es"]) and reference == "B. Fémur"


def test_invalid_records_are_named_by_file_record_line_and_field(rl_data_config):
    with pytest.raises(DataError) as err:
        load_questions(FIX / "mixed_invalid.json", rl_data_config())
    msg = str(err.value)
    assert str(FIX / "mixed_invalid.json") in msg and "6 of 10 records invalid" in msg
    assert "#1 (line 6) 'Respuesta_Verdadera' is empty" in msg
    assert "#2 (line 10) 'Pregunta_Verificable' is a number, expected a string" in msg
    assert "#6 (line 40) 'answer_idx'='E' is not one of the options ['A', 'B']" in msg
    assert "#7 (line 48) 'options' must be a dict {A: text} or a list, got a string" in msg
    assert "#8 (line 53) is a list, expected an object" in msg
    assert "#9 (line 58) missing 'Pregunta_Verificable' (open-ended question), and no 'options'" in msg
    assert "rl.data.on_invalid=skip" in msg


def test_on_invalid_skip_keeps_the_valid_records(rl_data_config):
    questions, bad, total = load_questions(FIX / "mixed_invalid.json", rl_data_config(on_invalid="skip"))
    assert total == 10 and len(bad) == 6
    assert [(q.kind, q.gold) for q in questions] == [("open", None), ("mcq", "B"), ("mcq", "B"), ("mcq", "A")]
    assert questions[2].options == {"A": "Hígado", "B": "Páncreas", "C": "Bazo"}  # list + 1-based answer_idx


def test_unmapped_schema_error_suggests_the_field_mapping(rl_data_config, tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps([{"Question": "q", "Answer": "a"}]), encoding="utf-8")
    with pytest.raises(DataError, match=r"rl\.data\.fields\.question/answer"):
        load_questions(path, rl_data_config())
    with pytest.raises(DataError, match="no such file"):
        load_questions(tmp_path / "missing.json", rl_data_config())


def test_prompts_are_rendered_exactly_as_in_sft_and_long_ones_dropped(rl_data_config, tiny_tokenizer):
    from medsft.data.render import prompt_ids

    questions, _, _ = load_questions(DEMO, rl_data_config())
    kept, prompts, dropped = filter_long_prompts(questions, tiny_tokenizer, "Eres un médico.", 10_000)
    assert dropped == 0 and prompts[0] == [{"role": "system", "content": "Eres un médico."},
                                           {"role": "user", "content": questions[0].question}]  # fmt: skip
    # TRL tokenizes conversational prompts with apply_chat_template(tokenize=True): the SFT prompt ids.
    trl_ids = tiny_tokenizer.apply_chat_template(prompts[:3], add_generation_prompt=True, tokenize=True,
                                                 return_dict=True)["input_ids"]  # fmt: skip
    assert trl_ids == [prompt_ids(tiny_tokenizer, q.question, "Eres un médico.") for q in questions[:3]]
    lengths = sorted(len(prompt_ids(tiny_tokenizer, q.question)) for q in questions)
    kept, _, dropped = filter_long_prompts(questions, tiny_tokenizer, None, lengths[len(lengths) // 2])
    assert dropped == len(questions) - len(kept) > 0
    ds = to_dataset(kept, [[{"role": "user", "content": q.question}] for q in kept])
    assert set(ds.column_names) >= {"prompt", "reference", "options", "gold", "question", "record"}


def test_bad_rl_data_fails_before_any_model_is_loaded(tmp_path, monkeypatch, compose_config):
    import medsft.rl.policy
    from medsft.run import run

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the data was validated")

    monkeypatch.setattr(medsft.rl.policy, "load_tokenizer", no_model)
    monkeypatch.setattr(medsft.rl.policy, "load_model", no_model)
    cfg = compose_config("stage=rl", "rl=grpo", "model=tiny_random", "logging=none", f"output_dir={tmp_path / 'ckpts'}",
                         f"rl.data.path={FIX / 'mixed_invalid.json'}")
    with pytest.raises(DataError, match="6 of 10 records invalid") as err:
        run(cfg, tmp_path / "run")
    assert err.value.exit_code == 3
    assert not (tmp_path / "ckpts").exists()  # nothing half-written
