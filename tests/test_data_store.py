"""The token store: memory-mapped by every reader (no token list per process), built by parallel workers that
give the very same tokens as one process, robust to a cache folder it cannot write; what the loop and the order
read of it."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_data_support import chatml_tokenizer, es_record, write_json  # noqa: E402

from medsft.data import tokenize  # noqa: E402
from medsft.data.dataset import build_sft_data  # noqa: E402
from medsft.data.order import DataOrder  # noqa: E402
from medsft.data.render import apply_length_policy, render_records  # noqa: E402
from medsft.data.records import load_records  # noqa: E402
from medsft.data.store import Examples, TokenStore, id_dtype  # noqa: E402
from medsft.data.templates import DEFAULT_RESPONSE_TEMPLATE  # noqa: E402

TOK = chatml_tokenizer()
ES_FIELDS = {"question": "Pregunta", "reasoning": "Razonamiento_Complejo", "response": "Respuesta",
             "source": "Archivo_fuente"}


@pytest.fixture
def records_file(tmp_path):
    return write_json(tmp_path / "r.jsonl", [es_record(i) for i in range(150)], jsonl=True)


def test_workers_give_the_same_tokens_as_one_process(tmp_path, cfg, records_file, monkeypatch):
    monkeypatch.setattr(tokenize, "CHUNK_RECORDS", 16)
    monkeypatch.setattr(tokenize, "MIN_PARALLEL_RECORDS", 0)
    one = build_sft_data(cfg(records_file, num_proc=1, cache_dir=str(tmp_path / "a"), val_ratio=0.1), TOK, seed=0)
    two = build_sft_data(cfg(records_file, num_proc=2, cache_dir=str(tmp_path / "b"), val_ratio=0.1), TOK, seed=0)
    assert one.stats["cache"] == two.stats["cache"] == "miss"
    assert one.train == two.train and one.val == two.val and len(one.train) == 135
    a, b = (TokenStore.open(Path(d.stats["cache_path"])) for d in (one, two))
    for name in ("ids", "offsets", "span_offsets", "spans", "index"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    # ... and the workers really were other processes.
    assert one.stats["sources"][0]["tokenized_by"] == 1 and two.stats["sources"][0]["tokenized_by"] == 2
    assert build_sft_data(cfg(records_file, num_proc=2, cache_dir=str(tmp_path / "b"), val_ratio=0.1), TOK,
                          seed=0).stats["sources"][0]["tokenized_by"] == 0  # a cache hit tokenizes nothing


def test_examples_come_from_a_mapped_file_not_python_lists(cfg, records_file):
    d = build_sft_data(cfg(records_file), TOK, seed=0)
    again = build_sft_data(cfg(records_file), TOK, seed=0)
    assert again.stats["cache"] == "hit"
    for data in (d, again):
        store = data.train.stores[0]
        assert isinstance(store.ids, np.memmap) and store.ids.dtype == np.uint16  # a 700-token vocabulary
        assert isinstance(data.train, Examples) and isinstance(data.train.lengths, np.ndarray)
    # Each example is what rendering one record gives, under the same length policy.
    records, _ = load_records(records_file, ES_FIELDS)
    by_index = {r.index: r for r in records}
    rows = d.train.stores[0].index[d.train.rows[:5]]
    for ex, index in zip(d.train[:5], rows):
        r = render_records(TOK, [by_index[int(index)]], DEFAULT_RESPONSE_TEMPLATE, None)[0]
        assert ex == apply_length_policy(r, 8192, "drop").example
    assert d.train[-1] == d.train[len(d.train) - 1]
    with pytest.raises(IndexError):
        d.train[len(d.train)]


def test_the_order_reads_lengths_without_building_examples(cfg, records_file, data_config, monkeypatch):
    d = build_sft_data(cfg(records_file), TOK, seed=0)
    expected = [len(ex["input_ids"]) for ex in d.train]

    def refuse(self, i):
        raise AssertionError("an example was built to measure its length")

    monkeypatch.setattr(Examples, "_example", refuse)
    for mode in ({}, {"packing": True}, {"group_by_length": True}):
        order = DataOrder.from_config(data_config(**mode), d.train, seed=0, pad_token_id=0)
        assert order.lengths == expected


def test_an_unwritable_cache_folder_keeps_the_tokens_in_memory(tmp_path, cfg, records_file, caplog):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    with caplog.at_level("WARNING"):
        d = build_sft_data(cfg(records_file, cache_dir=str(blocker / "cache")), TOK, seed=0)
    assert "could not write the data cache" in caplog.text and len(d.train) == 150
    assert not isinstance(d.train.stores[0].ids, np.memmap)
    ref = build_sft_data(cfg(records_file), TOK, seed=0)
    assert d.train == ref.train


def test_a_rebuilt_entry_never_rewrites_a_mapped_payload(cfg, records_file):
    """A corrupt manifest is rebuilt with a new payload file; readers of the old one keep valid data."""
    first = build_sft_data(cfg(records_file), TOK, seed=0)
    manifest = Path(first.stats["cache_path"])
    old_payloads = sorted(manifest.parent.glob(f"{manifest.stem}.*.bin"))
    manifest.write_text("garbage")
    again = build_sft_data(cfg(records_file), TOK, seed=0)
    assert again.stats["cache"] == "miss" and again.train == first.train
    assert sorted(manifest.parent.glob(f"{manifest.stem}.*.bin")) != old_payloads
    assert len(list(manifest.parent.glob(f"{manifest.stem}.*.bin"))) == 1


def test_store_round_trip_with_several_spans(tmp_path):
    from medsft.data.render import Rendered
    from medsft.data.store import StoreWriter

    rendered = [Rendered(list(range(10)), 2, 9, [(2, 4), (6, 9)]), Rendered([7, 8, 9], 1, 3)]
    w = StoreWriter(tmp_path / "x.tok", ids_dtype=id_dtype(128_256))
    for i, r in enumerate(rendered):
        w.add(*tokenize.pack([r], np.array([i + 5])))
    store = w.finish()
    assert isinstance(store.ids, np.memmap) and store.ids.dtype == np.int32 and store.index.tolist() == [5, 6]
    assert id_dtype(65_536) == "<u2" and id_dtype(65_537) == "<i4"
    ex = Examples([store], np.zeros(2), np.arange(2), np.array([10, 3]))
    assert ex[0]["labels"] == [-100, -100, 2, 3, -100, -100, 6, 7, 8, -100]
    assert Examples([store], np.zeros(1), np.zeros(1), np.array([10]), last_only=True)[0]["labels"] == \
        [-100] * 6 + [6, 7, 8, -100]
    assert ex[0] == apply_length_policy(rendered[0], 100, "drop").example
    assert ex.lengths.tolist() == [10, 3]


def test_tokenizing_while_validating_gives_the_same_store(tmp_path, cfg, monkeypatch):
    """A large file is tokenized by workers while it is still being validated: the same rows as tokenizing
    after; an error found late in the file leaves nothing behind; a noted cache entry is validated first."""
    from medsft.data import dataset

    monkeypatch.setattr(tokenize, "CHUNK_RECORDS", 16)
    monkeypatch.setattr(tokenize, "MIN_PARALLEL_RECORDS", 0)
    rows = [es_record(i) for i in range(120)]
    rows[5]["Razonamiento_Complejo"] = "x " * 5000  # over the character bound at max_seq_len=256: never fed
    path = write_json(tmp_path / "big.json", rows)
    after = build_sft_data(cfg(path, num_proc=2, max_seq_len=256, cache_dir=str(tmp_path / "a")), TOK, seed=0)
    monkeypatch.setattr(dataset, "SPECULATE_BYTES", 0)
    fed = []
    real_feed = tokenize.Pipeline.feed
    monkeypatch.setattr(tokenize.Pipeline, "feed", lambda self, *a: (fed.append(a[1]), real_feed(self, *a)))
    during = build_sft_data(cfg(path, num_proc=2, max_seq_len=256, cache_dir=str(tmp_path / "b")), TOK, seed=0)
    assert len(fed) == 120 and during.stats["cache"] == "miss" and during.stats["sources"][0]["tokenized_by"] == 2
    assert during.train == after.train and during.stats["dropped_overlong"] == 1
    a, b = (TokenStore.open(Path(d.stats["cache_path"])) for d in (after, during))
    assert np.array_equal(a.ids, b.ids) and np.array_equal(a.index, b.index) and np.array_equal(a.spans, b.spans)
    # The entry is noted: the next run validates first and maps it, tokenizing nothing.
    fed.clear()
    again = build_sft_data(cfg(path, num_proc=2, max_seq_len=256, cache_dir=str(tmp_path / "b")), TOK, seed=0)
    assert again.stats["cache"] == "hit" and not fed
    # Without the note, the speculative work is dropped when the entry turns out to exist.
    for hint in (tmp_path / "b" / "hints").iterdir():
        hint.unlink()
    again = build_sft_data(cfg(path, num_proc=2, max_seq_len=256, cache_dir=str(tmp_path / "b")), TOK, seed=0)
    assert again.stats["cache"] == "hit" and len(fed) == 120 and again.train == after.train
    # An invalid record near the end: the usual error, no temporary file, no worker left.
    rows[117]["Respuesta"] = 3
    write_json(path, rows)
    with pytest.raises(Exception, match=r"#117 \(line \d+\) 'Respuesta' is a number"):
        build_sft_data(cfg(path, num_proc=2, max_seq_len=256, cache_dir=str(tmp_path / "c")), TOK, seed=0)
    assert not list((tmp_path / "c").glob("*.tmp")) and not list((tmp_path / "c").glob("*.bin"))
    import multiprocessing

    assert not multiprocessing.active_children()
