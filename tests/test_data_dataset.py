"""build_sft_data: split, max_samples, overlong accounting, caching, English preset on the shared file, speed."""

from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_data_support import (  # noqa: E402
    FIXTURES,
    REPO_ROOT,
    chatml_tokenizer,
    es_record,
    llama3_tokenizer,
    shared_file,
    write_json,
)

from medsft.data.dataset import SFTData, build_sft_data, cache_root, resolve_data_path  # noqa: E402
from medsft.data.render import IGNORE_INDEX, prompt_ids  # noqa: E402
from medsft.errors import DataError  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return llama3_tokenizer()


@pytest.fixture
def es40(tmp_path):
    return write_json(tmp_path / "es40.jsonl", [es_record(i) for i in range(40)], jsonl=True)


def _keys(data: SFTData):
    return [tuple(ex["input_ids"]) for ex in data.train]


def test_split_is_seeded_and_disjoint(tok, cfg, es40):
    a = build_sft_data(cfg(es40, val_ratio=0.25), tok, seed=1)
    b = build_sft_data(cfg(es40, val_ratio=0.25), tok, seed=1)
    c = build_sft_data(cfg(es40, val_ratio=0.25), tok, seed=2)
    assert len(a.train) == 30 and len(a.val) == 10 and len(a.val_records) == 10
    assert _keys(a) == _keys(b) and a.val == b.val
    assert {r.index for r in a.val_records} != {r.index for r in c.val_records}
    val_ids = {tuple(ex["input_ids"]) for ex in a.val}
    assert not val_ids & set(_keys(a))
    # val_records are the held-out questions, rendered the same way as training (for the generation check).
    p = prompt_ids(tok, a.val_records[0].question)
    assert any(ex["input_ids"][: len(p)] == p for ex in a.val)
    s = a.stats
    assert s["records"] == s["kept"] == 40 and s["train_records"] == 30 and s["val_records"] == 10
    assert s["tokens"] == sum(len(ex["input_ids"]) for ex in a.train)
    assert s["loss_tokens"] == sum(sum(x != IGNORE_INDEX for x in ex["labels"]) for ex in a.train)
    assert s["content_hash"] and s["dropped_overlong"] == 0


def test_no_shuffle_and_max_samples(tok, cfg, es40):
    d = build_sft_data(cfg(es40, shuffle=False), tok, seed=0, max_samples=5)
    p0 = prompt_ids(tok, es_record(0)["Pregunta"])
    assert len(d.train) == 5 and d.train[0]["input_ids"][: len(p0)] == p0 and d.val is None
    d = build_sft_data(cfg(es40, max_samples=7), tok, seed=0)
    assert len(d.train) == 7 and d.stats["selected"] == 7
    with pytest.raises(DataError, match="val_ratio"):
        build_sft_data(cfg(es40, val_ratio=0.9), tok, seed=0, max_samples=1)


def test_val_path_and_overlap_removed_from_train(tok, cfg, tmp_path, es40):
    val = write_json(tmp_path / "val.json", [es_record(3), es_record(100)])
    d = build_sft_data(cfg(es40, val_path=str(val), val_ratio=0.5), tok, seed=0)  # val_path wins
    assert len(d.val) == 2 and len(d.train) == 39 and d.stats["val_overlap_dropped"] == 1
    assert d.stats["val_content_hash"] and [r.index for r in d.val_records] == [0, 1]


def test_overlong_policies_are_counted(tok, cfg, tmp_path):
    recs = [es_record(i) for i in range(6)]
    recs[2]["Razonamiento_Complejo"] = "muy largo " * 300
    path = write_json(tmp_path / "x.json", recs)
    d = build_sft_data(cfg(path, max_seq_len=400), tok, seed=0)
    assert len(d.train) == 5 and d.stats["dropped_overlong"] == 1
    d = build_sft_data(cfg(path, max_seq_len=400, overlong="truncate"), tok, seed=0)
    assert len(d.train) == 6 and d.stats["truncated"] == 1 and max(len(e["input_ids"]) for e in d.train) == 400
    with pytest.raises(DataError, match=r"record #2 \(line \d+\).*exceed data.max_seq_len=400"):
        build_sft_data(cfg(path, max_seq_len=400, overlong="error"), tok, seed=0)
    with pytest.raises(DataError, match="no training example fits data.max_seq_len=20"):
        build_sft_data(cfg(path, max_seq_len=20), tok, seed=0)
    # Every prompt alone exceeds 20 tokens: dropped even under truncate, never trained.
    with pytest.raises(DataError, match="with a prompt alone over the limit"):
        build_sft_data(cfg(path, max_seq_len=20, overlong="truncate"), tok, seed=0)


def test_invalid_records_error_or_skip(tok, cfg, tmp_path):
    recs = [es_record(i) for i in range(5)]
    del recs[3]["Respuesta"]
    path = write_json(tmp_path / "bad.jsonl", recs, jsonl=True)
    with pytest.raises(DataError, match=r"bad.jsonl: 1 of 5 records invalid: #3 \(line 4\) missing 'Respuesta'"):
        build_sft_data(cfg(path), tok, seed=0)
    d = build_sft_data(cfg(path, on_invalid="skip"), tok, seed=0)
    assert len(d.train) == 4 and d.stats["invalid_skipped"] == 1


def test_cache_reused_identical_and_invalidated(tok, cfg, tmp_path):
    recs = [es_record(i) for i in range(300)]
    path = write_json(tmp_path / "c.jsonl", recs, jsonl=True)
    t0 = time.perf_counter()
    first = build_sft_data(cfg(path, val_ratio=0.1), tok, seed=0)
    t1 = time.perf_counter()
    second = build_sft_data(cfg(path, val_ratio=0.1), tok, seed=0)
    t2 = time.perf_counter()
    assert first.stats["cache"] == "miss" and second.stats["cache"] == "hit"
    assert second.train == first.train and second.val == first.val
    assert (t2 - t1) < (t1 - t0), f"cache hit {t2 - t1:.3f}s not faster than build {t1 - t0:.3f}s"
    assert Path(first.stats["cache_path"]).parent == tmp_path / "cache"
    # Length policy and split are applied after the cache: changing them reuses the tokenization.
    other = build_sft_data(cfg(path, val_ratio=0.2, max_seq_len=300, overlong="truncate"), tok, seed=3)
    assert other.stats["cache"] == "hit"
    # What changes the tokens invalidates it: system prompt, response template, tokenizer, file content.
    assert build_sft_data(cfg(path, system_prompt="Eres médico."), tok, seed=0).stats["cache"] == "miss"
    assert build_sft_data(cfg(path, response_template="{reasoning}\n=> {response}"), tok, seed=0).stats[
        "cache"] == "miss"
    assert build_sft_data(cfg(path), chatml_tokenizer(), seed=0).stats["cache"] == "miss"
    write_json(path, recs[:-1] + [es_record(999)], jsonl=True)
    assert build_sft_data(cfg(path), tok, seed=0).stats["cache"] == "miss"
    # A corrupt entry is rebuilt, not trusted.
    entry = Path(second.stats["cache_path"])
    write_json(path, recs, jsonl=True)
    entry.write_bytes(b"garbage")
    again = build_sft_data(cfg(path, val_ratio=0.1), tok, seed=0)
    assert again.stats["cache"] == "miss" and again.train == first.train
    assert not list((tmp_path / "cache").glob("*.tmp"))


def test_cache_dir_default_respects_env(data_config, monkeypatch, tmp_path):
    monkeypatch.setenv("MEDSFT_CACHE", str(tmp_path / "mc"))
    assert cache_root(data_config()) == tmp_path / "mc" / "data"
    assert cache_root(data_config(cache_dir=str(tmp_path / "x"))) == tmp_path / "x"
    monkeypatch.delenv("MEDSFT_CACHE")
    assert cache_root(data_config()) == Path.home() / ".cache" / "medsft" / "data"


def test_paths(data_config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rel = "tests/fixtures/data/es_small.json"
    assert resolve_data_path(rel) == str(REPO_ROOT / rel)  # bundled paths work from any cwd
    with pytest.raises(DataError, match="data.path is not set"):
        resolve_data_path("???")
    with pytest.raises(DataError, match="no such file"):
        build_sft_data(data_config(path="nope/missing.json"), llama3_tokenizer(), seed=0)


def test_english_preset_on_shared_file(cfg, data_config):
    """data=huatuo_en trains HuatuoGPT-o1's English records unchanged (198 of them)."""
    path = shared_file("huatuo_o1/demo_data.json")
    data_cfg = data_config(preset="huatuo_en", path=str(path), max_seq_len=100_000, cache_dir=cfg(path).cache_dir)
    tok = chatml_tokenizer()
    t0 = time.perf_counter()
    d = build_sft_data(data_cfg, tok, seed=0, use_cache=False)
    dt = time.perf_counter() - t0
    print(f"\n[speed] validate+tokenize {path.name}: 198 records in {dt:.3f}s ({198 / dt:.0f} records/s, "
          f"{d.stats['tokens'] / dt / 1e3:.0f}k tokens/s) with a ChatML test tokenizer")
    assert len(d.train) == 198 and d.stats["extra_fields"]["Ground-True Answer"] == 198
    raw = json.loads(path.read_text(encoding="utf-8"))
    texts = {tok.decode([t for t, l in zip(ex["input_ids"], ex["labels"]) if l != IGNORE_INDEX]) for ex in d.train}
    want = "## Thinking\n\n" + raw[0]["Complex_CoT"].strip() + "\n\n## Final Response\n\n" + raw[0]["Response"].strip()
    assert want + "<|im_end|>" in texts


def test_bundled_demo_data_builds(tok, cfg):
    demo = REPO_ROOT / "data" / "demo_data.json"
    if not demo.exists():
        pytest.skip("data/demo_data.json not bundled yet")
    d = build_sft_data(cfg(demo, val_ratio=0.125, max_seq_len=100_000), tok, seed=42)
    assert len(d.train) + len(d.val) == d.stats["kept"] >= 40


N_SYNTHETIC = int(os.environ.get("MEDSFT_DATA_BENCH_N", "2000"))  # 10000 for the figures in the report


def test_synthetic_records_speed(tmp_path, cfg):
    """Validation + tokenization of synthetic records, fresh and from the cache (figures printed with -s)."""
    rng = random.Random(0)
    src = json.loads((FIXTURES / "es_small.json").read_text(encoding="utf-8"))
    recs = [{"Pregunta": f"{i}. " + rng.choice(src)["Pregunta"],
             "Razonamiento_Complejo": rng.choice(src)["Razonamiento_Complejo"],
             "Respuesta": rng.choice(src)["Respuesta"], "Archivo_fuente": "synthetic"} for i in range(N_SYNTHETIC)]
    path = write_json(tmp_path / "synthetic.jsonl", recs, jsonl=True)
    tok = chatml_tokenizer()
    t0 = time.perf_counter()
    d = build_sft_data(cfg(path, max_seq_len=4096), tok, seed=0)
    t1 = time.perf_counter()
    again = build_sft_data(cfg(path, max_seq_len=4096), tok, seed=0)
    t2 = time.perf_counter()
    n = len(d.train)
    print(f"\n[speed] {n} synthetic records: {t1 - t0:.2f}s fresh ({n / (t1 - t0):.0f} records/s, "
          f"{d.stats['tokens'] / (t1 - t0) / 1e3:.0f}k tokens/s); {t2 - t1:.2f}s from the cache "
          f"({n / (t2 - t1):.0f} records/s)")
    assert n == N_SYNTHETIC and again.stats["cache"] == "hit" and again.train[123] == d.train[123]
    assert t2 - t1 < t1 - t0


def test_accepts_the_composed_dictconfig(tok, tmp_path, data_config):
    """The training loop passes cfg.data as an OmegaConf node, not the dataclass."""
    node = data_config(path=str(FIXTURES / "es_small.json"), val_ratio=0.25, cache_dir=str(tmp_path / "c"))
    d = build_sft_data(node, tok, seed=0)
    assert len(d.train) == 3 and len(d.val) == 1 and d.stats["cache"] == "miss"
    assert build_sft_data(node, tok, seed=0).train == d.train
