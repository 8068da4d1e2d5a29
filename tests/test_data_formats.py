"""Record formats beyond the seed's schema: messages (multi-turn, system prompt), ShareGPT, Alpaca, HuatuoGPT-o1's
English records; exact multi-turn masking on a ChatML and a Llama-3 template; broken records in each format."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_data_support import (  # noqa: E402
    chatml_tokenizer,
    end_of_turn_text,
    es_record,
    llama3_tokenizer,
    write_json,
)

from medsft.data.dataset import build_sft_data  # noqa: E402
from medsft.data.records import load_records  # noqa: E402
from medsft.data.render import IGNORE_INDEX, render_records  # noqa: E402
from medsft.data.templates import DEFAULT_RESPONSE_TEMPLATE  # noqa: E402
from medsft.errors import DataError  # noqa: E402

TOKS = {"chatml": chatml_tokenizer(), "llama3": llama3_tokenizer()}
ES_FIELDS = {"question": "Pregunta", "reasoning": "Razonamiento_Complejo", "response": "Respuesta",
             "source": "Archivo_fuente"}

CONVERSATION = {
    "messages": [
        {"role": "system", "content": "Eres un médico de urgencias."},
        {"role": "user", "content": "Tengo fiebre desde ayer."},
        {"role": "assistant", "content": "¿Qué temperatura has medido?"},
        {"role": "user", "content": "39 grados y dolor de garganta."},
        {"role": "assistant", "content": "Probable faringitis: hidratación y paracetamol."},
        {"role": "user", "content": "¿Cuándo debo volver?"},
        {"role": "assistant", "content": "Si la fiebre dura más de tres días."},
    ]
}
ASSISTANT = [m["content"] for m in CONVERSATION["messages"] if m["role"] == "assistant"]


def _decode(tok, ids):
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _runs(ex):
    """The contiguous runs of loss-carrying positions of an example, as (start, end)."""
    runs, start = [], None
    for i, label in enumerate(ex["labels"] + [IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            runs.append((start, i))
            start = None
    return runs


@pytest.mark.parametrize("family", sorted(TOKS))
@pytest.mark.parametrize("loss_turns", ["all", "last"])
def test_multi_turn_messages_mask_exactly_the_assistant_turns(tmp_path, cfg, family, loss_turns):
    """Decoded loss-carrying text is exactly every assistant turn plus its end-of-turn token (or only the last
    turn's with data.loss_turns=last): no user or system token, nothing the template writes around them."""
    tok = TOKS[family]
    path = write_json(tmp_path / "chat.jsonl", [CONVERSATION], jsonl=True)
    d = build_sft_data(cfg(path, loss_turns=loss_turns, max_seq_len=4096), tok, seed=0)
    assert d.report.record_format == "messages" and d.report.detected
    ex = d.train[0]
    eot = end_of_turn_text(family)
    expected = ASSISTANT if loss_turns == "all" else ASSISTANT[-1:]
    assert [_decode(tok, ex["input_ids"][a:b]) for a, b in _runs(ex)] == [c + eot for c in expected]
    assert all(ex["labels"][i] == ex["input_ids"][i] for a, b in _runs(ex) for i in range(a, b))
    # Each turn's prompt is what generation would be given: the conversation so far + the generation prompt.
    msgs = CONVERSATION["messages"]
    for k, (a, _) in enumerate(_runs(ex)):
        upto = [i for i, m in enumerate(msgs) if m["role"] == "assistant"][k + (len(ASSISTANT) - len(expected))]
        gen = tok.apply_chat_template(msgs[:upto], tokenize=True, add_generation_prompt=True, return_dict=False)
        assert ex["input_ids"][:a] == list(gen)
    full = tok.apply_chat_template(msgs, tokenize=True, return_dict=False)
    assert ex["input_ids"] == list(full)
    assert d.stats["loss_tokens"] == sum(b - a for a, b in _runs(ex))


def test_llama3_multi_turn_mask_matches_the_templates_generation_markers(tmp_path):
    """The Llama-3 template marks every assistant turn with {% generation %}: the labels cover exactly those."""
    tok = TOKS["llama3"]
    recs, _ = load_records(write_json(tmp_path / "c.json", [CONVERSATION]), ES_FIELDS, record_format="messages")
    r = render_records(tok, recs, DEFAULT_RESPONSE_TEMPLATE, None)[0]
    out = tok.apply_chat_template(CONVERSATION["messages"], tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True)
    mask = [0] * len(r.ids)
    for a, b in r.loss_spans():
        mask[a:b] = [1] * (b - a)
    assert out["input_ids"] == r.ids and mask == list(out["assistant_masks"])


def test_system_prompt_of_the_record_wins_and_data_system_prompt_fills_in(tmp_path, cfg):
    tok = TOKS["llama3"]
    no_system = {"messages": CONVERSATION["messages"][1:3]}
    path = write_json(tmp_path / "two.jsonl", [CONVERSATION, no_system], jsonl=True)
    d = build_sft_data(cfg(path, system_prompt="Responde en español.", shuffle=False), tok, seed=0)
    texts = [_decode(tok, ex["input_ids"]) for ex in d.train]
    assert "Eres un médico de urgencias." in texts[0] and "Responde en español." not in texts[0]
    assert "Responde en español." in texts[1]


def test_sharegpt_and_alpaca_fixtures(tmp_path, cfg):
    tok = TOKS["chatml"]
    share = [{"conversations": [{"from": "system", "value": "Sé breve."}, {"from": "human", "value": "¿Qué es la tos?"},
                                {"from": "gpt", "value": "Un reflejo defensivo."}, {"from": "human", "value": "¿Y la fiebre?"},
                                {"from": "gpt", "value": "Una subida de la temperatura."}]}]
    d = build_sft_data(cfg(write_json(tmp_path / "s.json", share)), tok, seed=0)
    assert d.report.record_format == "sharegpt"
    assert [_decode(tok, d.train[0]["input_ids"][a:b]) for a, b in _runs(d.train[0])] == [
        "Un reflejo defensivo.<|im_end|>", "Una subida de la temperatura.<|im_end|>"]
    alpaca = [{"instruction": "Resume el caso.", "input": "Varón de 40 años con tos.", "output": "Tos en adulto."},
              {"instruction": "Define fiebre.", "input": "", "output": "Temperatura > 38 °C.", "system": "Sé claro.",
               "history": [["Hola", "Hola, ¿en qué ayudo?"]]}]
    d = build_sft_data(cfg(write_json(tmp_path / "a.jsonl", alpaca, jsonl=True), shuffle=False), tok, seed=0)
    assert d.report.record_format == "alpaca"
    first, second = d.train[0], d.train[1]
    assert "Resume el caso.\n\nVarón de 40 años con tos." in _decode(tok, first["input_ids"])
    assert [_decode(tok, first["input_ids"][a:b]) for a, b in _runs(first)] == ["Tos en adulto.<|im_end|>"]
    assert [_decode(tok, second["input_ids"][a:b]) for a, b in _runs(second)] == [
        "Hola, ¿en qué ayudo?<|im_end|>", "Temperatura > 38 °C.<|im_end|>"]
    assert "<|im_start|>system\nSé claro.<|im_end|>" in _decode(tok, second["input_ids"])


def test_reasoning_layout_applies_to_reasoning_content_and_huatuo_records(tmp_path, cfg):
    tok = TOKS["chatml"]
    rec = {"messages": [{"role": "user", "content": "¿Diagnóstico?"},
                        {"role": "assistant", "content": "Gripe.", "reasoning_content": "Fiebre y mialgias."}]}
    d = build_sft_data(cfg(write_json(tmp_path / "r.json", [rec])), tok, seed=0)
    (a, b), = _runs(d.train[0])
    assert _decode(tok, d.train[0]["input_ids"][a:b]) == (
        "## Thinking\n\nFiebre y mialgias.\n\n## Final Response\n\nGripe.<|im_end|>")
    en = [{"Question": "q?", "Complex_CoT": "think", "Response": "answer", "Ground-True Answer": "x"}]
    d = build_sft_data(cfg(write_json(tmp_path / "en.json", en)), tok, seed=0)  # auto: HuatuoGPT-o1's keys
    assert d.report.record_format == "huatuo" and d.report.extra_fields == {"Ground-True Answer": 1}
    (a, b), = _runs(d.train[0])
    assert _decode(tok, d.train[0]["input_ids"][a:b]) == "## Thinking\n\nthink\n\n## Final Response\n\nanswer<|im_end|>"


# Broken records of every format: (format, records, substrings of the DataError).
BROKEN = {
    "messages-role": ("messages", [{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}],
                      ["#0 (line 1)", "messages[1].role is 'bot'", "expected one of ['assistant', 'system', 'user']"]),
    "messages-empty": ("messages", [{"messages": [{"role": "user", "content": "a"},
                                                  {"role": "assistant", "content": " \u200b "}]}],
                       ["#0", "'messages[1].content' is empty (only zero-width characters)"]),
    "messages-order": ("messages", [{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                                                  {"role": "assistant", "content": "c"}]}],
                       ["#0", "turns must alternate user / assistant"]),
    "messages-ends-with-user": ("messages", [{"messages": [{"role": "user", "content": "a"},
                                                           {"role": "assistant", "content": "b"},
                                                           {"role": "user", "content": "c"}]}],
                                ["ends with a user turn"]),
    "messages-late-system": ("messages", [{"messages": [{"role": "user", "content": "a"},
                                                        {"role": "system", "content": "s"},
                                                        {"role": "assistant", "content": "b"}]}],
                             ["messages[1] is a system turn after the first turn"]),
    "messages-not-a-list": ("messages", [{"messages": "hola"}], ["'messages' is a string, expected a list of turns"]),
    "messages-missing": ("messages", [{"chat": []}], ["no record has the key 'messages'", "data.format"]),
    "sharegpt-value": ("sharegpt", [{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": 3}]}],
                       ["'conversations[1].value' is a number, expected a string"]),
    "sharegpt-no-value": ("sharegpt", [{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt"}]}],
                          ["conversations[1] has no 'value'"]),
    "alpaca-output": ("alpaca", [{"instruction": "a", "output": None}], ["'output' is null, expected a string"]),
    "alpaca-missing": ("alpaca", [{"instruction": "a", "input": "b"}], ["missing 'output'"]),
    "alpaca-history": ("alpaca", [{"instruction": "a", "output": "b", "history": [["x"]]}],
                       ["history[0] is a list, expected [instruction, output]"]),
    "huatuo-type": ("huatuo", [{"Question": "q", "Complex_CoT": ["c"], "Response": "r"}],
                    ["'Complex_CoT' is a list, expected a string"]),
    "medsft-surrogate": ("medsft", [es_record(0, Respuesta="fiebre \ud800 alta")],
                         ["'Respuesta' holds a lone surrogate (\\ud800 at character 7)", "not valid Unicode"]),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_records_name_file_record_and_field(tmp_path, name):
    fmt, records, parts = BROKEN[name]
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")  # ASCII: \ud800 stays an escape
    with pytest.raises(DataError) as info:
        load_records(path, ES_FIELDS, record_format=fmt)
    msg = str(info.value)
    assert msg.startswith(str(path)) and "Traceback" not in msg
    for part in parts:
        assert part in msg, f"{part!r} not in {msg!r}"


def test_skip_keeps_the_valid_records_of_any_format(tmp_path):
    good = CONVERSATION
    bad = {"messages": [{"role": "assistant", "content": "sin pregunta"}]}
    path = write_json(tmp_path / "mix.jsonl", [good, bad, good], jsonl=True)
    records, report = load_records(path, ES_FIELDS, on_invalid="skip", record_format="auto")
    assert len(records) == 2 and report.n_invalid == 1 and report.duplicates == 1
    assert records[0].turns and records[0].system == "Eres un médico de urgencias."
    assert records[0].question == "Tengo fiebre desde ayer." and records[0].response == ASSISTANT[-1]


def test_old_file_type_values_of_data_format_point_at_data_file_type(compose_config, tmp_path, cfg):
    from medsft.config import validate
    from medsft.errors import ConfigError

    with pytest.raises(ConfigError, match=r"data.format='jsonl' is a file type.*use data.file_type=jsonl"):
        validate(compose_config("data.format=jsonl"))
    path = write_json(tmp_path / "x.jsonl", [es_record(0)], jsonl=True)
    with pytest.raises(DataError, match="use data.file_type=parquet"):
        build_sft_data(cfg(path, format="parquet"), TOKS["chatml"], seed=0)
    d = build_sft_data(cfg(path, format="medsft", file_type="jsonl"), TOKS["chatml"], seed=0)
    assert len(d.train) == 1 and d.report.format == "jsonl"
