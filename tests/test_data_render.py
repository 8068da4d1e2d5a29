"""Chat rendering and loss masks, with real byte-level BPE tokenizers (Llama-3 and ChatML templates)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_data_support import (  # noqa: E402
    CHATML_TEMPLATE,
    FIXTURES,
    TOKENIZERS,
    chatml_tokenizer,
    end_of_turn_text,
    llama3_tokenizer,
    plain_tokenizer,
)

from medsft.data.records import Record, load_records  # noqa: E402
from medsft.data.render import (  # noqa: E402
    IGNORE_INDEX,
    apply_length_policy,
    build_messages,
    end_of_turn_ids,
    ensure_chat_template,
    format_response,
    prompt_ids,
    render_example,
    render_records,
)
from medsft.data.templates import DEFAULT_RESPONSE_TEMPLATE, LLAMA3_CHAT_TEMPLATE  # noqa: E402
from medsft.errors import DataError  # noqa: E402

_TOKS = {name: make() for name, make in TOKENIZERS.items()}
FAMILIES = sorted(_TOKS)

# The field map of the Spanish schema (conf/data/base.yaml), as the record files here use it.
ES_FIELDS = {"question": "Pregunta", "reasoning": "Razonamiento_Complejo", "response": "Respuesta",
             "source": "Archivo_fuente"}


def _decode(tok, ids):
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _rec(q, r, a, i=0):
    return Record(q, r, a, None, i, i + 1, "mem.jsonl")


def _check_example(tok, family, rec, ex, system_prompt=None, template=DEFAULT_RESPONSE_TEMPLATE):
    ids, labels = ex["input_ids"], ex["labels"]
    assert len(ids) == len(labels)
    p = prompt_ids(tok, rec.question, system_prompt)
    # The generation prompt is exactly the masked prefix.
    assert ids[: len(p)] == p
    assert all(x == IGNORE_INDEX for x in labels[: len(p)])
    loss = [i for i, x in enumerate(labels) if x != IGNORE_INDEX]
    assert loss, "no loss tokens"
    assert loss == list(range(len(p), loss[-1] + 1)), "loss span not contiguous right after the prompt"
    assert [labels[i] for i in loss] == [ids[i] for i in loss]
    content = format_response(template, rec.reasoning, rec.response)
    assert _decode(tok, [ids[i] for i in loss]) == content + end_of_turn_text(family)
    # Whatever follows the end-of-turn token (ChatML's "\n") carries no loss.
    assert all(x == IGNORE_INDEX for x in labels[loss[-1] + 1 :])


# Text of any script (accents, CJK, emoji, control and odd whitespace), never empty after strip.
_text = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",), exclude_characters="\x00"),
    min_size=1,
    max_size=60,
).map(str.strip).filter(bool)
_spanish = st.sampled_from(
    ["¿Cuál es el diagnóstico?", "Fiebre 39 °C", "dolor\n\ntorácico", "  ## Final Response  ", "{response}",
     "niño ñandú — ácido", "😀 emoji", "a\tb", "\r\n", "x" * 40]
)
_field = st.one_of(
    _text,
    _spanish.map(str.strip).filter(bool),
    st.lists(_spanish, min_size=1, max_size=4).map(" ".join).map(str.strip).filter(bool),
)


@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(q=_field, r=_field, a=_field, system=st.one_of(st.none(), _field))
def test_mask_property(data_config, family, q, r, a, system):
    """For random records: prompt all -100; the loss tokens decode to exactly layout + end-of-turn token."""
    tok = _TOKS[family]
    rec = _rec(q, r, a)
    ex = render_example(tok, rec, data_config(system_prompt=system, max_seq_len=100_000))
    _check_example(tok, family, rec, ex, system)


@pytest.mark.parametrize("family", FAMILIES)
def test_fast_path_equals_apply_chat_template(family):
    """Batched rendering gives the same ids as apply_chat_template(tokenize=True), record by record."""
    tok = _TOKS[family]
    records, _ = load_records(FIXTURES / "es_small.json", ES_FIELDS)
    rendered = render_records(tok, records, DEFAULT_RESPONSE_TEMPLATE, "Eres un médico experto.")
    for rec, r in zip(records, rendered):
        msgs = build_messages(rec.question, "Eres un médico experto.")
        full = msgs + [{"role": "assistant", "content": format_response(DEFAULT_RESPONSE_TEMPLATE, rec.reasoning,
                                                                         rec.response)}]
        assert r.ids == list(tok.apply_chat_template(full, tokenize=True, return_dict=False))
        gen = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, return_dict=False)
        assert r.ids[: r.prompt_len] == list(gen)


def test_llama3_mask_matches_generation_markers(data_config):
    """The Llama-3 template marks the assistant span with {% generation %}: our labels cover exactly it."""
    tok = _TOKS["llama3"]
    records, _ = load_records(FIXTURES / "es_small.json", ES_FIELDS)
    for rec in records:
        ex = render_example(tok, rec, data_config())
        msgs = build_messages(rec.question) + [
            {"role": "assistant", "content": format_response(DEFAULT_RESPONSE_TEMPLATE, rec.reasoning, rec.response)}]
        out = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        assert out["input_ids"] == ex["input_ids"]
        assert [int(x != IGNORE_INDEX) for x in ex["labels"]] == list(out["assistant_masks"])


def test_real_smollm2_tokenizer_if_prepared(data_config):
    """The embedded SmolLM2 tokenizer (ChatML with {% generation %}), when already prepared in the cache."""
    base = Path(os.environ.get("MEDSFT_CACHE") or Path.home() / ".cache" / "medsft").expanduser()
    d = base / "models" / "smollm2-135m-instruct"
    if not (d / "tokenizer.json").exists():
        pytest.skip(f"embedded SmolLM2 not prepared in {d} (`medsft prepare-model` prepares it)")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(d))
    records, _ = load_records(FIXTURES / "es_small.json", ES_FIELDS)
    for rec in records:
        ex = render_example(tok, rec, data_config())
        _check_example(tok, "chatml", rec, ex)
        msgs = build_messages(rec.question) + [
            {"role": "assistant", "content": format_response(DEFAULT_RESPONSE_TEMPLATE, rec.reasoning, rec.response)}]
        out = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        assert out["input_ids"] == ex["input_ids"]
        assert [int(x != IGNORE_INDEX) for x in ex["labels"]] == list(out["assistant_masks"])
    assert end_of_turn_ids(tok) == [tok.convert_tokens_to_ids("<|im_end|>")]


@pytest.mark.parametrize("family", FAMILIES)
def test_end_of_turn_ids(family):
    tok = _TOKS[family]
    assert end_of_turn_ids(tok) == [tok.convert_tokens_to_ids(end_of_turn_text(family))]


def test_chatml_trailing_newline_is_not_trained(data_config):
    tok = _TOKS["chatml"]
    ex = render_example(tok, _rec("q?", "r.", "a."), data_config())
    assert _decode(tok, ex["input_ids"][-2:]) == "<|im_end|>\n"
    assert ex["labels"][-1] == IGNORE_INDEX and ex["labels"][-2] == tok.convert_tokens_to_ids("<|im_end|>")


def test_template_less_tokenizer_gets_llama3_template(data_config, caplog):
    tok = plain_tokenizer()
    n = len(tok)
    with caplog.at_level("WARNING"):
        assert ensure_chat_template(tok) is True
        assert ensure_chat_template(tok) is False  # told once
    assert tok.chat_template == LLAMA3_CHAT_TEMPLATE
    assert caplog.text.count("has no chat template") == 1 and "resize" in caplog.text
    assert len(tok) == n + 3  # <|start_header_id|>, <|end_header_id|>, <|eot_id|> as single special tokens
    rec = _rec("¿Qué es la fiebre?", "Pienso.", "Una subida de la temperatura.")
    ex = render_example(tok, rec, data_config())
    _check_example(tok, "llama3", rec, ex)


def test_prompt_ids_of_template_less_tokenizer_match_training():
    """prompt_ids assigns the same template as training, so eval never sees another format."""
    tok = plain_tokenizer()
    p = prompt_ids(tok, "¿Qué es?")
    assert _decode(tok, p).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_custom_response_template_and_braces(data_config):
    tok = _TOKS["chatml"]
    template = "Razonamiento: {reasoning}\nRespuesta final: {response} {no_es_campo}"
    rec = _rec("¿Dosis?", "Peso {kg} x 10", "500 mg {response}")
    ex = render_example(tok, rec, data_config(response_template=template))
    _check_example(tok, "chatml", rec, ex, template=template)
    assert "Peso {kg} x 10\nRespuesta final: 500 mg {response} {no_es_campo}" in _decode(tok, ex["input_ids"])


# ------------------------------------------------------------------------------------------ length policy


def _long_record():
    return _rec("¿Pregunta corta?", "razonamiento largo " * 40, "respuesta final " * 10)


@pytest.mark.parametrize("family", FAMILIES)
def test_truncate_keeps_prompt_cuts_response_without_end_of_turn(data_config, family):
    tok = _TOKS[family]
    rec = _long_record()
    full = render_example(tok, rec, data_config(max_seq_len=100_000))
    n_prompt = len(prompt_ids(tok, rec.question))
    limit = n_prompt + 20
    ex = render_example(tok, rec, data_config(max_seq_len=limit, overlong="truncate"))
    assert len(ex["input_ids"]) == limit and ex["input_ids"] == full["input_ids"][:limit]
    assert all(x == IGNORE_INDEX for x in ex["labels"][:n_prompt])
    assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:]  # 20 response tokens, all trained
    eot = tok.convert_tokens_to_ids(end_of_turn_text(family))
    assert eot not in ex["input_ids"][n_prompt:]  # the response did not end: no stop token learned


@pytest.mark.parametrize("family", FAMILIES)
def test_drop_error_and_prompt_alone_too_long(data_config, family):
    tok = _TOKS[family]
    rec = _long_record()
    n_prompt = len(prompt_ids(tok, rec.question))
    assert render_example(tok, rec, data_config(max_seq_len=n_prompt + 5, overlong="drop")) is None
    with pytest.raises(DataError, match=r"mem.jsonl: record #0 \(line 1\).*exceed data.max_seq_len"):
        render_example(tok, rec, data_config(max_seq_len=n_prompt + 5, overlong="error"))
    # A prompt that fills the limit is never trained, whatever the policy.
    for policy in ("drop", "truncate"):
        assert render_example(tok, rec, data_config(max_seq_len=n_prompt, overlong=policy)) is None
    with pytest.raises(DataError, match="the prompt alone"):
        render_example(tok, rec, data_config(max_seq_len=n_prompt - 1, overlong="error"))


@pytest.mark.parametrize("family", FAMILIES)
def test_exact_fit_and_trailing_tokens(family):
    """An example whose loss span fits exactly is kept whole (end-of-turn included); only the untrained tail
    after it may be cut."""
    tok = _TOKS[family]
    rec = _long_record()
    r = render_records(tok, [rec], DEFAULT_RESPONSE_TEMPLATE, None)[0]
    res = apply_length_policy(r, r.loss_end, "error", rec)
    assert res.status == "ok" and len(res.example["input_ids"]) == r.loss_end
    assert res.example["labels"][-1] == tok.convert_tokens_to_ids(end_of_turn_text(family))
    res = apply_length_policy(r, r.loss_end - 1, "truncate", rec)
    eot = tok.convert_tokens_to_ids(end_of_turn_text(family))
    assert res.status == "truncated" and res.example["labels"][-1] != eot


# ------------------------------------------------------------------------------------------ broken templates


def _with_template(template):
    tok = chatml_tokenizer()
    tok.chat_template = template
    return tok


def test_template_whose_prompt_is_not_a_prefix_is_rejected(data_config):
    # The generation prompt says "assistant:" but the rendered turn says "assistant\n".
    bad = CHATML_TEMPLATE.replace("{{ '<|im_start|>assistant\n' }}", "{{ '<|im_start|>assistant:\n' }}")
    with pytest.raises(DataError, match=r"mem.jsonl: record #0 \(line 1\).*not render the prompt.*prefix"):
        render_example(_with_template(bad), _rec("q?", "r", "a"), data_config())


def test_template_without_end_of_turn_token_is_rejected(data_config):
    bad = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
           "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    with pytest.raises(DataError, match="end-of-turn token.*never learn to stop"):
        render_example(_with_template(bad), _rec("q?", "r", "a"), data_config())


def test_template_that_alters_the_answer_is_rejected(data_config):
    bad = CHATML_TEMPLATE.replace("message['content'] + '<|im_end|>'", "message['content'] | upper + '<|im_end|>'")
    with pytest.raises(DataError, match="changes the assistant's text"):
        render_example(_with_template(bad), _rec("q?", "razonamiento", "respuesta"), data_config())


def test_prompt_merging_into_response_is_rejected(data_config):
    """A generation prompt ending mid-word ("tratamien") whose response continues it ("to ..."): BPE merges
    across the boundary, so the prompt's ids are not a prefix of the conversation's ids."""
    tok = chatml_tokenizer()
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert ids("tratamien") + ids("to") != ids("tratamiento")  # the premise: these pieces merge
    generation_prompt = "'<|im_start|>assistant\ntratamien'"
    tok.chat_template = CHATML_TEMPLATE.replace("'<|im_start|>assistant\n'", generation_prompt).replace(
        "'<|im_start|>' + message['role'] + '\n' + message['content']",
        "'<|im_start|>' + message['role'] + '\n' + (message['role'] == 'assistant' and 'tratamien' or '') "
        "+ message['content']")
    with pytest.raises(DataError, match=r"record #0 \(line 1\).*token ids are not a prefix"):
        render_example(tok, _rec("q?", "r", "a"), data_config(response_template="to {reasoning} {response}"))


def test_messages_and_format_response():
    assert build_messages("q") == [{"role": "user", "content": "q"}]
    assert build_messages("q", "s")[0] == {"role": "system", "content": "s"}
    assert format_response(DEFAULT_RESPONSE_TEMPLATE, "r", "a") == "## Thinking\n\nr\n\n## Final Response\n\na"


def test_llama3_prompt_layout():
    tok = llama3_tokenizer()
    text = _decode(tok, prompt_ids(tok, "¿Qué?", "Sistema"))
    assert text == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nSistema<|eot_id|>"
                    "<|start_header_id|>user<|end_header_id|>\n\n¿Qué?<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
