"""benchmarks/data_scale.py runs end to end (--smoke: 500 generated records, every step, this checkout)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_data_scale_benchmark_smoke(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("data_scale", ROOT / "benchmarks" / "data_scale.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "lines.jsonl"
    assert bench.main(["--smoke", "--work", str(tmp_path / "w"), "--json-out", str(out), "--num-proc", "1"]) == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    steps = {r["step"]: r for r in lines}
    assert set(steps) == {"check", "stats", "build", "map"} and steps["check"]["rc"] == 0
    assert steps["build"]["cache"] == "miss" and steps["map"]["cache"] == "hit"
    assert steps["build"]["tokens"] == steps["map"]["tokens"] == steps["stats"]["tokens"] > 0
    assert steps["map"]["rss_after_epoch"] >= steps["map"]["rss_before"] > 0
    text = capsys.readouterr().out
    assert "| current | map |" in text and "RSS bytes/token" in text
    assert (tmp_path / "w" / "records-500.json").stat().st_size > 400_000
