"""Loading and validation: every broken-file kind gives a message naming file, record (and line) and field."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_data_support import BROKEN, FIXTURES, REPO_ROOT, es_record, shared_file, write_json  # noqa: E402

from medsft.data.records import LoadReport, Record, load_records  # noqa: E402
from medsft.errors import DataError  # noqa: E402

HUATUO_EN = {"question": "Question", "reasoning": "Complex_CoT", "response": "Response", "source": None}

# file -> substrings its DataError must contain (besides the file's path).
BROKEN_CASES = {
    "missing_field.json": ["1 of 3 records invalid", "#1 (line 8)", "missing 'Respuesta'"],
    "wrong_type.json": ["#1 (line 8)", "'Respuesta' is a number, expected a string"],
    "null_field.json": ["#1 (line 8)", "'Razonamiento_Complejo' is null"],
    "empty_text.json": ["#1 (line 8)", "'Pregunta' is empty"],
    "not_an_object.json": ["#1 (line 8)", "is a string, expected an object"],
    "invalid_json.json": ["invalid JSON in record #1", "starting line 8", "line 11 column 5"],
    "invalid_json_line.jsonl": ["#2 (line 3)", "invalid JSON at column"],
    "not_utf8.json": ["#1 (line 8)", "'Respuesta' is not valid UTF-8", "iconv"],
    "not_utf8.jsonl": ["#1 (line 2)", "'Pregunta' is not valid UTF-8"],
    "empty.json": ["file is empty"],
    "empty_list.json": ["the list holds no records"],
    "not_a_list.json": ["top-level JSON must be a list", "got an object with keys", "'Pregunta'"],
    "unclosed.json": ["the list is not closed", "after record #1"],
    "trailing_comma.json": ["trailing ','", "after record #0"],
    "english_schema.json": ["no record has the question field 'Pregunta'", "huatuo_en", "#0 (line 2) missing"],
}

# The field map of the Spanish schema (conf/data/base.yaml), as the record files here use it.
ES_FIELDS = {"question": "Pregunta", "reasoning": "Razonamiento_Complejo", "response": "Respuesta",
             "source": "Archivo_fuente"}


def test_broken_corpus_is_complete():
    """One fixture per error kind, and every fixture is exercised."""
    assert sorted(p.name for p in BROKEN.iterdir()) == sorted(BROKEN_CASES)


@pytest.mark.parametrize("name", sorted(BROKEN_CASES))
def test_broken_file_message(name):
    path = BROKEN / name
    with pytest.raises(DataError) as info:
        load_records(path, ES_FIELDS)
    msg = str(info.value)
    assert msg.startswith(str(path)), msg
    for part in BROKEN_CASES[name]:
        assert part in msg, f"{part!r} not in {msg!r}"
    assert "Traceback" not in msg


@pytest.mark.parametrize(
    "name,kept",
    [("missing_field.json", 2), ("wrong_type.json", 1), ("invalid_json_line.jsonl", 3), ("not_utf8.json", 1),
     ("not_utf8.jsonl", 2), ("not_an_object.json", 1)],
)
def test_skip_drops_invalid_records(name, kept, caplog):
    with caplog.at_level(logging.WARNING, logger="medsft.data.records"):
        records, report = load_records(BROKEN / name, ES_FIELDS, on_invalid="skip")
    assert len(records) == report.kept == kept
    assert len(report.invalid) == report.total - kept
    assert "skipped" in caplog.text and report.invalid[0].split()[0] in caplog.text
    assert all(isinstance(r, Record) and r.question and r.response for r in records)


def test_file_level_errors_are_not_skippable():
    for name in ("invalid_json.json", "empty.json", "not_a_list.json"):
        with pytest.raises(DataError):
            load_records(BROKEN / name, ES_FIELDS, on_invalid="skip")


def test_error_list_is_capped(tmp_path):
    recs = [es_record(i) for i in range(30)]
    for i in range(3, 28):
        recs[i]["Respuesta"] = "   "
    path = write_json(tmp_path / "many.jsonl", recs, jsonl=True)
    with pytest.raises(DataError) as info:
        load_records(path, ES_FIELDS)
    msg = str(info.value)
    assert "25 of 30 records invalid" in msg and "#3 (line 4) 'Respuesta' is empty" in msg
    assert "and 15 more" in msg and "#20 " not in msg
    assert "data.on_invalid=skip" in msg


def test_valid_fixture_json_and_jsonl_agree():
    a, ra = load_records(FIXTURES / "es_small.json", ES_FIELDS)
    b, rb = load_records(FIXTURES / "es_small.jsonl", ES_FIELDS)
    assert [r.key() for r in a] == [r.key() for r in b]
    assert (ra.format, rb.format) == ("json", "jsonl")
    assert [r.line for r in b] == [1, 2, 3, 4]
    assert a[0].line == 2 and a[1].line > a[0].line
    assert a[0].source == "medsft_tests_v1" and a[0].index == 0
    assert ra.invalid == [] and ra.duplicates == 0 and ra.extra_fields == {}


def test_jsonl_content_in_a_json_file_is_detected():
    records, report = load_records(FIXTURES / "jsonl_named.json", ES_FIELDS)
    assert report.format == "jsonl" and len(records) == 3 and records[2].line == 3


def test_duplicates_warned_and_extra_fields_counted(caplog):
    with caplog.at_level(logging.WARNING):
        records, report = load_records(FIXTURES / "duplicates_extra.json", ES_FIELDS)
    assert len(records) == 5  # duplicates are kept (warned)
    assert report.duplicates == 1 and "1 duplicate records" in caplog.text
    assert report.extra_fields == {"Extra": 1, "Notas": 2}
    assert "1 duplicates" in report.summary() and "'Notas' x2" in report.summary()


def test_strips_whitespace_and_optional_source(tmp_path):
    rec = es_record(0, Pregunta="  ¿Qué?\n", Archivo_fuente=None)
    rec2 = es_record(1)
    del rec2["Archivo_fuente"]
    records, _ = load_records(write_json(tmp_path / "x.json", [rec, rec2]), ES_FIELDS)
    assert records[0].question == "¿Qué?" and records[0].source is None and records[1].source is None
    bad = es_record(0, Archivo_fuente=3)
    with pytest.raises(DataError, match="'Archivo_fuente' is a number"):
        load_records(write_json(tmp_path / "y.json", [bad]), ES_FIELDS)


def test_bom_and_parquet(tmp_path):
    recs = [es_record(i) for i in range(3)]
    p = tmp_path / "bom.json"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps(recs, ensure_ascii=False).encode())
    assert len(load_records(p, ES_FIELDS)[0]) == 3
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "x.parquet")
    records, report = load_records(tmp_path / "x.parquet", ES_FIELDS)
    assert report.format == "parquet" and [r.question for r in records] == [r["Pregunta"] for r in recs]
    assert records[0].line is None and "record #0" in records[0].where()


def test_missing_path_and_directory(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_records(tmp_path / "nope.json", ES_FIELDS)
    with pytest.raises(DataError, match="is a directory"):
        load_records(tmp_path, ES_FIELDS)
    with pytest.raises(DataError, match="on_invalid"):
        load_records(FIXTURES / "es_small.json", ES_FIELDS, on_invalid="ignore")


def test_english_mapping_on_shared_huatuo_file(data_config):
    """conf/data/huatuo_en.yaml maps HuatuoGPT-o1's English schema; the 198 public records load unchanged."""
    path = shared_file("huatuo_o1/demo_data.json")
    fields = data_config(preset="huatuo_en").fields
    assert (fields.question, fields.reasoning, fields.response, fields.source) == (
        "Question", "Complex_CoT", "Response", None)
    records, report = load_records(path, fields)
    raw = json.loads(path.read_text(encoding="utf-8"))
    assert report.total == report.kept == len(records) == 198
    assert records[5].question == raw[5]["Question"].strip()
    assert records[5].reasoning == raw[5]["Complex_CoT"].strip()
    assert records[5].response == raw[5]["Response"].strip()
    assert report.extra_fields["Open-ended Verifiable Question"] == 198 and "Question" not in report.extra_fields
    with pytest.raises(DataError, match="huatuo_en"):  # the Spanish default on English data says what to do
        load_records(path, ES_FIELDS)


def test_shared_spanish_sample_and_bundled_demo():
    records, report = load_records(shared_file("medsft_es_sample/test_sample.json"), ES_FIELDS)
    assert len(records) == 3 and report.invalid == []
    demo = REPO_ROOT / "data" / "demo_data.json"
    if not demo.exists():
        pytest.skip("data/demo_data.json not bundled yet")
    records, report = load_records(demo, ES_FIELDS)
    assert report.total >= 40 and report.kept == report.total and report.duplicates == 0
    assert all(r.source for r in records)


def test_load_report_summary_is_one_line():
    rep = LoadReport(path="x.json", total=3, kept=2, invalid=["#1 missing 'Respuesta'"], format="json")
    assert rep.summary() == "x.json: 3 records (json); 2 kept; 1 invalid (skipped)"
