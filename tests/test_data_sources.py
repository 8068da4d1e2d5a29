"""Where records come from (Parquet and `save_to_disk` folders, Arrow files, Hub ids offline), the streaming JSON
reader, and bad input made clear: invalid Unicode, deep nesting, unreadable files, UTF-16 / CR-only files, the
layout's headers inside the text, zero-width answers, giant records, over-long validation splits."""

from __future__ import annotations

import builtins
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_data_support import REPO_ROOT, chatml_tokenizer, es_record, llama3_tokenizer, write_json  # noqa: E402

from medsft.data import sources  # noqa: E402
from medsft.data.dataset import build_sft_data  # noqa: E402
from medsft.data.records import load_records  # noqa: E402
from medsft.data.render import apply_length_policy, render_records  # noqa: E402
from medsft.data.sources import SourceSpec, open_source  # noqa: E402
from medsft.data.templates import DEFAULT_RESPONSE_TEMPLATE  # noqa: E402
from medsft.errors import DataError  # noqa: E402

ES_FIELDS = {"question": "Pregunta", "reasoning": "Razonamiento_Complejo", "response": "Respuesta",
             "source": "Archivo_fuente"}
TOK = chatml_tokenizer()


def medsft_data(*args):
    proc = subprocess.run([sys.executable, "-m", "medsft.cli", "data", *map(str, args)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


# ------------------------------------------------------------------------------------------ columnar and Hub


def test_parquet_folder_and_its_splits(tmp_path, cfg):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    folder = tmp_path / "pq"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist([es_record(i) for i in range(6)]), folder / "train-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist([es_record(i) for i in range(6, 10)]), folder / "train-00001-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist([es_record(i) for i in range(100, 103)]), folder / "test-00000-of-00001.parquet")
    d = build_sft_data(cfg(folder, shuffle=False), TOK, seed=0)
    assert len(d.train) == 10 and d.report.format == "dataset" and d.report.record_format == "medsft"
    t = build_sft_data(cfg(folder, split="test"), TOK, seed=0)
    assert len(t.train) == 3 and t.stats["content_hash"] != d.stats["content_hash"]
    with pytest.raises(DataError, match=r"pq.*split.*nope"):
        build_sft_data(cfg(folder, split="nope"), TOK, seed=0)
    # A parquet file on its own: read by row groups, not loaded whole.
    pq.write_table(pa.Table.from_pylist([es_record(i) for i in range(50)]), tmp_path / "one.parquet", row_group_size=8)
    one = build_sft_data(cfg(tmp_path / "one.parquet", shuffle=False, val_ratio=0.1), TOK, seed=0)
    assert len(one.train) == 45 and len(one.val) == 5 and [r.index for r in one.val_records] == [45, 46, 47, 48, 49]


def test_save_to_disk_folders_and_arrow_files(tmp_path, cfg):
    datasets = pytest.importorskip("datasets")
    rows = [es_record(i) for i in range(8)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    d = build_sft_data(cfg(tmp_path / "ds", shuffle=False), TOK, seed=0)
    plain = build_sft_data(cfg(write_json(tmp_path / "same.json", rows), shuffle=False), TOK, seed=0)
    assert d.report.format == "dataset" and d.train == plain.train  # the same examples, whatever the container
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:5]),
                          "validation": datasets.Dataset.from_list(rows[5:])}).save_to_disk(str(tmp_path / "dd"))
    assert len(build_sft_data(cfg(tmp_path / "dd", split="validation"), TOK, seed=0).train) == 3
    with pytest.raises(DataError, match=r"no split 'test' \(splits: \['train', 'validation'\]\).*data.split"):
        build_sft_data(cfg(tmp_path / "dd", split="test"), TOK, seed=0)
    import pyarrow as pa

    table = pa.Table.from_pylist(rows)
    with pa.OSFile(str(tmp_path / "x.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    a = build_sft_data(cfg(tmp_path / "x.arrow", shuffle=False), TOK, seed=0)
    assert a.report.format == "arrow" and a.train == plain.train


def test_hub_id_offline_and_not_cached_is_a_clear_error(tmp_path, cfg, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(DataError) as info:
        build_sft_data(cfg("medsft-tests/no-such-dataset", split="train", subset="es"), TOK, seed=0)
    msg = str(info.value)
    assert msg.startswith("medsft-tests/no-such-dataset: not a local file or folder") and "offline" in msg
    # A path that is clearly a file stays a missing-file error, never a Hub lookup.
    with pytest.raises(DataError, match="nope/missing.json: no such file"):
        build_sft_data(cfg("nope/missing.json"), TOK, seed=0)


# ------------------------------------------------------------------------------------------ the JSON reader


def test_streaming_json_reader_equals_a_whole_file_parse(tmp_path, monkeypatch):
    """With a window of 97 bytes (records straddle every read), items, lines and byte spans are exact."""
    monkeypatch.setattr(sources, "CHUNK_BYTES", 97)
    rows = [es_record(i, Pregunta=f"¿ñandú {i}? " + "é" * (i * 7)) for i in range(30)]
    rows[7]["Razonamiento_Complejo"] = "x" * 3000  # one record longer than many windows
    path = write_json(tmp_path / "big.json", rows)
    src = open_source(SourceSpec(str(path)))
    items = list(src.items())
    assert [it.value for it in items] == rows
    text = path.read_text(encoding="utf-8")
    raw = path.read_bytes()
    starts = [text.count("\n", 0, text.index(json.dumps(r["Pregunta"], ensure_ascii=False))) for r in rows]
    assert [it.line for it in items] == [s for s in starts]  # the line of "{" is the one before "Pregunta"
    for it in items:
        assert json.loads(raw[it.start:it.end]) == rows[it.index]
    assert src.content_hash == open_source(SourceSpec(str(path))).content_hash
    picked = [items[i] for i in (3, 7, 29)]
    again = src.read([p.index for p in picked], np.array([p.start for p in picked]), np.array([p.end for p in picked]))
    assert [a.value for a in again] == [p.value for p in picked]
    # A syntax error far into the file names the same record, line and column as with a big window.
    broken = text.replace('"Respuesta": "Bronquitis aguda, caso 21;', '"Respuesta": Bronquitis aguda, caso 21;')
    (tmp_path / "broken.json").write_text(broken, encoding="utf-8")
    with pytest.raises(DataError) as small:
        load_records(tmp_path / "broken.json", ES_FIELDS)
    monkeypatch.setattr(sources, "CHUNK_BYTES", 1 << 22)
    with pytest.raises(DataError) as large:
        load_records(tmp_path / "broken.json", ES_FIELDS)
    assert str(small.value) == str(large.value) and "invalid JSON in record #21" in str(small.value)


# ------------------------------------------------------------------------------------------ hardening (issue 21)


def test_lone_surrogates_are_caught_by_check_and_by_training(tmp_path, cfg):
    rec = es_record(1)
    text = json.dumps([es_record(0), rec])  # ASCII: the escape stays as written
    path = tmp_path / "surrogate.json"
    path.write_text(text.replace("caso 1;", "caso 1 \\udc80;"), encoding="utf-8")
    rc, out, err = medsft_data("check", path)
    assert rc == 1 and "#1 (line 1) 'Respuesta' holds a lone surrogate (\\udc80" in err and "Traceback" not in err
    with pytest.raises(DataError, match=r"record.*#1.*'Respuesta' holds a lone surrogate"):
        build_sft_data(cfg(path), TOK, seed=0)
    d = build_sft_data(cfg(path, on_invalid="skip"), TOK, seed=0)
    assert len(d.train) == 1


def test_deep_nesting_is_a_clear_error_not_a_recursion_error(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    (tmp_path / "deep.json").write_text(f'[{json.dumps(es_record(0))}, {{"Pregunta": {deep}}}]', encoding="utf-8")
    with pytest.raises(DataError, match=r"deep.json: record #1 \(starting line 1\) is nested too deeply"):
        load_records(tmp_path / "deep.json", ES_FIELDS)
    (tmp_path / "deep.jsonl").write_text(json.dumps(es_record(0)) + "\n" + deep + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"#1 \(line 2\) nested too deeply"):
        load_records(tmp_path / "deep.jsonl", ES_FIELDS)
    records, report = load_records(tmp_path / "deep.jsonl", ES_FIELDS, on_invalid="skip")
    assert len(records) == 1 and report.n_invalid == 1


def test_unreadable_file_is_a_clear_error(tmp_path, monkeypatch):
    path = write_json(tmp_path / "locked.json", [es_record(0)])
    path.chmod(0)
    if os.geteuid() == 0:  # root reads anything: make the open fail as it does for everyone else
        real_open = builtins.open

        def guarded(file, *a, **k):
            if str(file) == str(path):
                raise PermissionError(13, "Permission denied", str(file))
            return real_open(file, *a, **k)

        monkeypatch.setattr(builtins, "open", guarded)
    with pytest.raises(DataError, match=r"locked.json: cannot be read \(Permission denied\); check its permissions"):
        load_records(path, ES_FIELDS)
    monkeypatch.undo()
    path.chmod(0o644)


def test_utf16_and_cr_only_files_get_an_encoding_hint(tmp_path):
    rows = [es_record(0), es_record(1)]
    (tmp_path / "u16.json").write_bytes(json.dumps(rows, ensure_ascii=False).encode("utf-16"))
    with pytest.raises(DataError, match=r"u16.json: the file is UTF-16 encoded.*iconv -f UTF-16 -t UTF-8"):
        load_records(tmp_path / "u16.json", ES_FIELDS)
    (tmp_path / "u16le.jsonl").write_bytes(json.dumps(rows[0], ensure_ascii=False).encode("utf-16-le"))
    with pytest.raises(DataError, match=r"holds NUL bytes.*UTF-16"):
        load_records(tmp_path / "u16le.jsonl", ES_FIELDS)
    (tmp_path / "mac.jsonl").write_bytes("".join(json.dumps(r, ensure_ascii=False) + "\r" for r in rows).encode())
    with pytest.raises(DataError, match=r"mac.jsonl: the file's lines end with a carriage return only.*tr"):
        load_records(tmp_path / "mac.jsonl", ES_FIELDS)
    # A JSON list with CR-only line ends parses, and its lines are counted by CR.
    (tmp_path / "mac.json").write_bytes(json.dumps(rows, ensure_ascii=False, indent=1).replace("\n", "\r").encode())
    records, _ = load_records(tmp_path / "mac.json", ES_FIELDS)
    assert [r.line for r in records] == [2, 8]


def test_layout_headers_inside_the_text_warn_skip_or_refuse(tmp_path, cfg, caplog):
    rows = [es_record(i) for i in range(4)]
    rows[2]["Razonamiento_Complejo"] += "\n\n## Final Response\n\nEsto no es la respuesta."
    path = write_json(tmp_path / "clash.json", rows)
    with caplog.at_level(logging.WARNING):
        d = build_sft_data(cfg(path), TOK, seed=0)
    assert len(d.train) == 4 and d.stats["header_clashes"] == 1
    assert "#2 (line 14) 'Razonamiento_Complejo' contains '## Final Response'" in caplog.text
    assert len(build_sft_data(cfg(path, headers_in_text="skip"), TOK, seed=0).train) == 3
    with pytest.raises(DataError, match=r"1 of 4 records hold the response layout's own headers.*#2 \(line 14\)"):
        build_sft_data(cfg(path, headers_in_text="error"), TOK, seed=0)


def test_zero_width_only_answer_counts_as_empty(tmp_path):
    path = write_json(tmp_path / "zw.json", [es_record(0), es_record(1, Respuesta="\u200b\u200d\ufeff ")])
    with pytest.raises(DataError, match=r"#1 \(line 8\) 'Respuesta' is empty \(only zero-width characters\)"):
        load_records(path, ES_FIELDS)


def test_a_giant_record_is_bounded_by_characters_before_tokenizing(tmp_path, cfg, monkeypatch):
    """A record far longer in characters than max_seq_len tokens can cover never reaches the tokenizer whole:
    dropped (counted) under drop, an error naming it under error, and under truncate only a prefix is
    tokenized, giving the very tokens the whole record's truncation would."""
    from medsft.data import dataset, tokenize

    rows = [es_record(i) for i in range(3)]
    rows[1]["Razonamiento_Complejo"] = "la fiebre alta persistente " * 8000  # 216 000 characters
    path = write_json(tmp_path / "giant.json", rows)
    seen: list[int] = []

    def spy(real):
        def wrapped(tokenizer, records, *a, **k):
            seen.extend(r.chars() for r in records)
            return real(tokenizer, records, *a, **k)
        return wrapped

    monkeypatch.setattr(tokenize, "render_records", spy(tokenize.render_records))
    monkeypatch.setattr(dataset, "render_records", spy(dataset.render_records))
    bound = tokenize.char_bound(TOK, 256)
    d = build_sft_data(cfg(path, max_seq_len=256), TOK, seed=0)
    assert len(d.train) == 2 and d.stats["dropped_overlong"] == 1 and max(seen) < bound
    with pytest.raises(DataError, match=r"giant.json: record #1 \(line 8\): it has 216,\d{3} characters, certainly over "
                                         r"data.max_seq_len=256 tokens"):
        build_sft_data(cfg(path, max_seq_len=256, overlong="error"), TOK, seed=0)
    seen.clear()
    t = build_sft_data(cfg(path, max_seq_len=256, overlong="truncate", shuffle=False), TOK, seed=0)
    assert len(t.train) == 3 and t.stats["truncated"] == 1 and max(seen) < 4 * bound
    records, _ = load_records(path, ES_FIELDS)
    whole = render_records(TOK, [records[1]], DEFAULT_RESPONSE_TEMPLATE, None)[0]
    assert t.train[1] == apply_length_policy(whole, 256, "truncate").example


def test_every_validation_record_over_long_warns(tmp_path, cfg, caplog):
    rows = [es_record(i) for i in range(8)]
    val = [es_record(100, Razonamiento_Complejo="muy largo " * 200), es_record(101, Respuesta="larga " * 300)]
    path, val_path = write_json(tmp_path / "t.json", rows), write_json(tmp_path / "v.json", val)
    with caplog.at_level(logging.WARNING):
        d = build_sft_data(cfg(path, val_path=str(val_path), max_seq_len=200), TOK, seed=0)
    assert len(d.train) == 8 and len(d.val) == 0
    assert "all 2 validation records are over data.max_seq_len=200" in caplog.text
    assert "there is no validation loss" in caplog.text


def test_the_over_long_hint_does_not_suggest_truncate_when_it_is_set(tmp_path, cfg):
    path = write_json(tmp_path / "x.json", [es_record(i) for i in range(3)])
    with pytest.raises(DataError) as info:
        build_sft_data(cfg(path, max_seq_len=20, overlong="truncate"), llama3_tokenizer(), seed=0)
    assert "set data.overlong=truncate" not in str(info.value) and "raise data.max_seq_len" in str(info.value)
    with pytest.raises(DataError, match="set data.overlong=truncate"):
        build_sft_data(cfg(path, max_seq_len=20), llama3_tokenizer(), seed=0)


def test_the_character_bound_only_where_no_character_can_vanish():
    """A token covers at most its vocabulary entry's length; a tokenizer that drops characters (whitespace
    pre-tokenization) has no bound, so nothing is ever judged over-long unseen."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from medsft.data.tokenize import char_bound, chars_per_token

    longest = max(len(k) for k in TOK.get_vocab())
    assert chars_per_token(TOK) == longest and char_bound(TOK, 100) == 100 * longest
    words = Tokenizer(models.WordLevel({"[UNK]": 0, "fiebre": 1}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    assert chars_per_token(PreTrainedTokenizerFast(tokenizer_object=words)) is None
