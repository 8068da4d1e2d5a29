"""data.mixture: several sources, each with its own format and field map, mixed by weight or count; a seeded
train/validation split per source; per-source counts in the stats, the log and metrics.jsonl."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_data_support import chatml_tokenizer, es_record, write_json  # noqa: E402

from medsft.config import validate  # noqa: E402
from medsft.data.dataset import build_sft_data  # noqa: E402
from medsft.data.mixture import draw, draw_counts  # noqa: E402
from medsft.errors import ConfigError, DataError  # noqa: E402

TOK = chatml_tokenizer()


def hydra_list(sources: list[dict]) -> str:
    """A list of sources in Hydra's override grammar: [{path: '/x.json', weight: 0.5}, ...]."""
    return "[" + ", ".join("{" + ", ".join(f"{k}: {v!r}" for k, v in s.items()) + "}" for s in sources) + "]"


def en_record(i: int) -> dict:
    return {"Question": f"Patient {i} with cough. Diagnosis?", "Complex_CoT": f"Case {i}: think about bronchitis.",
            "Response": f"Acute bronchitis, case {i}."}


@pytest.fixture
def files(tmp_path):
    es = write_json(tmp_path / "es.jsonl", [es_record(i) for i in range(40)], jsonl=True)
    en = write_json(tmp_path / "en.json", [en_record(i) for i in range(20)])
    return es, en


@pytest.fixture
def mix(tmp_path, data_config):
    def make(*sources, **kw):
        kw.setdefault("cache_dir", str(tmp_path / "cache"))
        return data_config(preset="mixture", mixture=list(sources), **kw)

    return make


def _language(tok, ex) -> str:
    text = tok.decode(ex["input_ids"], skip_special_tokens=False)
    return "es" if "Paciente" in text else "en" if "Patient" in text else "?"


def test_weights_give_the_shares_and_the_counts_match(files, mix, caplog):
    es, en = files
    cfg = mix({"name": "es", "path": str(es), "weight": 0.5},
              {"name": "en", "path": str(en), "format": "huatuo", "weight": 0.5})
    with caplog.at_level(logging.INFO, logger="medsft.data"):
        d = build_sft_data(cfg, TOK, seed=3)
    langs = [_language(TOK, ex) for ex in d.train]
    # The largest mixture that repeats no example: all 20 English, 20 of the 40 Spanish.
    assert langs.count("es") == 20 and langs.count("en") == 20 and len(d.train) == 40
    by_name = {s["name"]: s for s in d.stats["sources"]}
    assert by_name["es"]["train_examples"] == 20 and by_name["en"]["train_examples"] == 20
    assert by_name["en"]["format"] == "huatuo" and by_name["es"]["format"] == "medsft"
    assert by_name["es"]["train_tokens"] + by_name["en"]["train_tokens"] == d.stats["tokens"]
    assert "data mixture: es 20 of 40 examples (50.0%" in caplog.text
    # 3:1 -> 20 English need 60 Spanish, which do not exist: 40 Spanish and 13 English.
    d = build_sft_data(mix({"path": str(es), "weight": 3}, {"path": str(en), "weight": 1}), TOK, seed=3)
    assert [_language(TOK, ex) for ex in d.train].count("en") == 13 and len(d.train) == 53
    assert len({tuple(ex["input_ids"]) for ex in d.train}) == 53  # no example twice


def test_counts_take_subsets_or_repeat_and_are_seeded(files, mix):
    es, en = files
    cfg = mix({"name": "es", "path": str(es), "count": 10}, {"name": "en", "path": str(en), "count": 30})
    a, b = build_sft_data(cfg, TOK, seed=1), build_sft_data(cfg, TOK, seed=1)
    langs = [_language(TOK, ex) for ex in a.train]
    assert langs.count("es") == 10 and langs.count("en") == 30 and a.train == b.train
    en_texts = [tuple(ex["input_ids"]) for ex in a.train if _language(TOK, ex) == "en"]
    assert len(set(en_texts)) == 20  # every English example once, 10 of them twice
    c = build_sft_data(cfg, TOK, seed=2)
    assert {tuple(x["input_ids"]) for x in c.train} != {tuple(x["input_ids"]) for x in a.train}


def test_the_split_is_per_source_and_seeded(files, mix):
    es, en = files
    cfg = mix({"name": "es", "path": str(es), "weight": 1}, {"name": "en", "path": str(en), "weight": 1,
                                                              "format": "huatuo", "val_ratio": 0.5}, val_ratio=0.25)
    a, b, c = (build_sft_data(cfg, TOK, seed=s) for s in (5, 5, 6))
    by_name = {s["name"]: s for s in a.stats["sources"]}
    assert by_name["es"]["val_examples"] == 10 and by_name["en"]["val_examples"] == 10
    assert len(a.val) == 20 and a.val == b.val and a.val != c.val
    assert sorted(_language(TOK, ex) for ex in a.val).count("en") == 10
    val_ids = {tuple(ex["input_ids"]) for ex in a.val}
    assert not val_ids & {tuple(ex["input_ids"]) for ex in a.train}
    assert {r.path for r in a.val_records} == {str(es), str(en)}


def test_mixture_config_is_validated(compose_config, files):
    es, en = files

    def bad(*sources):
        with pytest.raises(ConfigError) as info:
            validate(compose_config("data=mixture", f"data.mixture={hydra_list(list(sources))}"))
        return str(info.value)

    assert "data.mixture[0] needs exactly one of weight" in bad({"path": str(es)})
    assert "unknown key(s) ['wieght']" in bad({"path": str(es), "wieght": 1})
    assert "mixes weights and counts" in bad({"path": str(es), "weight": 1}, {"path": str(en), "count": 3})
    assert "data.mixture[1].format='json' is a file type" in bad({"path": str(es), "weight": 1},
                                                                  {"path": str(en), "weight": 1, "format": "json"})
    assert "data.mixture[0].count=0 must be an integer >= 1" in bad({"path": str(es), "count": 0})
    assert "data.path is not set" in str(pytest.raises(ConfigError, validate, compose_config("data=mixture")).value)
    validate(compose_config("data=demo_es_en"))


def test_draw_helpers():
    from medsft.data.mixture import SourceConfig

    def sc(weight=None, count=None):
        return SourceConfig("s", 0, None, "medsft", None, 0.0, weight, count)

    assert draw_counts([sc(0.7), sc(0.3)], [1000, 198]) == [462, 198]
    assert draw_counts([sc(count=5), sc(count=500)], [10, 10]) == [5, 500]
    import numpy as np

    picked = draw(4, 10, np.random.default_rng(0))
    assert sorted(np.bincount(picked).tolist()) == [2, 2, 3, 3]


@pytest.mark.slow
def test_a_training_run_records_each_sources_share_in_metrics(tmp_path, files):
    from train_utils import train_in_process

    es, en = files
    mixture = hydra_list([{"name": "es", "path": str(es), "count": 8},
                          {"name": "en", "path": str(en), "format": "huatuo", "count": 4}])
    _, run_dir = train_in_process(tmp_path, "data=mixture", f"data.mixture={mixture}", "train.max_steps=1",
                                  "data.max_samples=0", "data.val_ratio=0", f"data.cache_dir={tmp_path / 'c'}",
                                  "checkpoint.save_final=false", "checkpoint.save_at_epoch_end=false")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    data = [r for r in records if r["kind"] == "data"]
    assert len(data) == 1 and data[0]["examples"] == 12
    assert [(s["name"], s["train_examples"]) for s in data[0]["sources"]] == [("es", 8), ("en", 4)]
    assert all(s["train_tokens"] > 0 for s in data[0]["sources"])


def test_medsft_data_understands_mixtures_and_conversations(tmp_path, files, capsys):
    """`medsft data check|stats|show|sample` on a mixture config and on a multi-turn messages file."""
    from test_data_support import llama3_tokenizer

    from medsft.cli.data import cli_main

    es, en = files
    mixture = hydra_list([{"name": "es", "path": str(es), "weight": 0.5},
                          {"name": "en", "path": str(en), "format": "huatuo", "weight": 0.5}])
    assert cli_main(["check", "data=mixture", f"data.mixture={mixture}"]) == 0
    out = capsys.readouterr().out
    assert "OK: [es]" in out and "OK: [en]" in out and "huatuo" in out
    model = tmp_path / "tok"
    llama3_tokenizer().save_pretrained(model)
    assert cli_main(["stats", "data=mixture", f"data.mixture={mixture}", "--model", str(model), "--json",
                     f"data.cache_dir={tmp_path / 'c'}"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["mixture_examples"] == {"es": 20, "en": 20} and stats["examples_after_policy"] == 40
    assert [s["name"] for s in stats["sources"]] == ["es", "en"]
    assert cli_main(["show", "data=mixture", f"data.mixture={mixture}", "--index", "0", "--model", str(model)]) == 1
    assert "--source" in capsys.readouterr().err
    assert cli_main(["show", "data=mixture", f"data.mixture={mixture}", "--source", "en", "--index", "3",
                     "--model", str(model), "--color", "never"]) == 0
    assert "Patient 3 with cough" in capsys.readouterr().out
    chat = write_json(tmp_path / "chat.jsonl", [{"messages": [
        {"role": "user", "content": "¿Tos?"}, {"role": "assistant", "content": "Desde cuándo."},
        {"role": "user", "content": "Dos días."}, {"role": "assistant", "content": "Reposo."}]}], jsonl=True)
    assert cli_main(["show", str(chat), "--index", "0", "--model", str(model), "--color", "never"]) == 0
    text = capsys.readouterr().out
    assert "2 assistant turns" in text and text.split("\n", 2)[2].count("[[") == 2  # (after the legend)
    assert "[[Desde cuándo.<|eot_id|>]]" in text and "[[Reposo.<|eot_id|>]]" in text
    assert cli_main(["sample", str(chat), "--n", "1", "--out", str(tmp_path / "s.json")]) == 0
    assert json.loads((tmp_path / "s.json").read_text())[0]["messages"][3]["content"] == "Reposo."
    assert cli_main(["check", str(chat), "--format", "alpaca"]) == 1
    assert "no record has the key 'instruction'" in capsys.readouterr().err


def test_a_weighted_source_with_no_example_that_fits_is_named(tmp_path, mix):
    """A source whose every record is over max_seq_len used to make the whole mixture draw nothing, reported as
    "no training example fits" although the other sources' examples fit."""
    es = write_json(tmp_path / "es.json", [es_record(i) for i in range(10)])
    long_en = [{**en_record(i), "Complex_CoT": "cough " * 400} for i in range(6)]
    en = write_json(tmp_path / "long.json", long_en)
    cfg = mix({"name": "es", "path": str(es), "weight": 0.7},
              {"name": "en", "path": str(en), "format": "huatuo", "weight": 0.3}, max_seq_len=256)
    with pytest.raises(DataError, match=r"data.mixture source 'en' \(.*long.json\): none of its \d+ training "
                                        r"records fits data.max_seq_len=256 \(\d+ over-long"):
        build_sft_data(cfg, TOK, seed=0)
    cfg.overlong = "truncate"
    assert len(build_sft_data(cfg, TOK, seed=0).train) > 0  # truncated rows: both sources draw
