"""`medsft eval` end to end: Hydra composition, errors, and full runs on CPU (tiny-random; SmolLM2 when slow)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import medsft
from medsft.errors import ConfigError, DataError
from medsft.cli.eval import cli_main
from medsft.eval.config import compose_eval_config
from medsft.eval.report import accuracy_ci95, render_markdown, wilson_interval
from medsft.eval.runner import run_evaluation

ROOT = Path(medsft.__file__).resolve().parents[1]
FIX = Path(__file__).parent / "fixtures" / "eval"
SHARED = Path(os.environ.get("MEDSFT_SHARED_DATA") or ROOT.parent / "shared" / "data")


def read_outputs(out: Path):
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    return preds, summary, (out / "summary.md").read_text(encoding="utf-8")


def ci_text(k, n):
    lo, hi = accuracy_ci95(k, n)
    return f"{100 * k / n:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"


@pytest.mark.parametrize(
    "k, n, lo, hi",
    [
        (0, 10, 0.0, 0.2775),
        (5, 10, 0.2366, 0.7634),
        (50, 100, 0.4038, 0.5962),
        (10, 10, 0.7225, 1.0),
        (1, 10, 0.0179, 0.4042),
        (12, 100, 0.0700, 0.1981),
        (0, 0, 0.0, 1.0),  # no questions: nothing is known
    ],
)
def test_wilson_interval_known_values(k, n, lo, hi):
    got = wilson_interval(k, n)
    assert got == pytest.approx((lo, hi), abs=5e-5)
    assert accuracy_ci95(k, n) == pytest.approx([lo, hi], abs=1e-9)  # stored rounded to 4 decimals
    assert 0.0 <= got[0] <= (k / n if n else 0.0) <= got[1] <= 1.0


def test_wilson_interval_narrows_with_n_and_rejects_bad_counts():
    widths = [hi - lo for lo, hi in (wilson_interval(n // 2, n) for n in (10, 100, 1000))]
    assert widths[0] > widths[1] > widths[2]
    assert wilson_interval(3, 10, z=2.576)[1] > wilson_interval(3, 10)[1]  # 99% is wider than 95%
    for k, n in [(11, 10), (-1, 10), (0, -1)]:
        with pytest.raises(ValueError):
            wilson_interval(k, n)


def test_summary_markdown_shows_the_interval():
    bench = {"n": 100, "n_correct": 12, "accuracy": 0.12, "accuracy_ci95": accuracy_ci95(12, 100),
             "unparsed": 3, "unparsed_rate": 0.03, "format_compliance": 1.0, "mean_output_chars": 10.0}  # fmt: skip
    old = {**bench, "n": 10, "n_correct": 5, "accuracy": 0.5}  # a summary written before the interval existed
    del old["accuracy_ci95"]
    summary = {"benchmarks": {"b100": bench, "b10": old},
               "overall": {**bench, "n": 110, "n_correct": 17, "accuracy": 17 / 110, "accuracy_ci95": accuracy_ci95(17, 110)}}  # fmt: skip
    md = render_markdown(summary)
    assert "| b100 | 100 | 12.0% [7.0, 19.8] |" in md
    assert "| b10 | 10 | 50.0% [23.7, 76.3] |" in md
    assert f"| **all (micro)** | 110 | {ci_text(17, 110)} |" in md
    assert "95% Wilson score interval" in md


def test_compose_presets_and_overrides():
    cfg = compose_eval_config(["model=tiny_random", "eval=headqa_es", "eval.limit=200", "eval.max_new_tokens=64"])
    assert cfg.model.path == "tiny-random:llama" and cfg.eval.kind == "headqa_es"
    assert cfg.eval.limit == 200 and cfg.eval.max_new_tokens == 64 and list(cfg.eval.splits) == ["test"]
    assert cfg.eval.path.endswith("shared/data/headqa_es") and cfg.eval.do_sample is False
    for preset, kind in [("huatuo_o1", "huatuo_o1"), ("casimedicos_es", "casimedicos_es")]:
        assert compose_eval_config([f"eval={preset}"]).eval.kind == kind
    cfg = compose_eval_config(["eval=huatuo_o1", "eval.subsets=[PubMedQA_test]", "model.path=/some/ckpt"])
    assert list(cfg.eval.subsets) == ["PubMedQA_test"] and cfg.model.path == "/some/ckpt"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["eval.limt=5"], "eval.limt"),  # typo: fails at composition
        (["eval.batch_size=abc"], "batch_size"),  # wrong type
        (["eval.backend=foo"], "eval.backend='foo' is not one of"),
        (["eval.max_new_tokens=0"], "eval.max_new_tokens=0 must be >= 1"),
        (["eval.repetition_penalty=0"], "eval.repetition_penalty=0.0 must be > 0"),
        (["eval=custom"], "missing required value(s): eval.path"),
        (["eval=nope"], "nope"),
    ],
)
def test_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=None) as err:
        compose_eval_config(overrides)
    assert message in str(err.value)


def test_missing_data_names_the_path(tmp_path):
    cfg = compose_eval_config(["eval=headqa_es", f"eval.path={tmp_path}/nowhere"])
    with pytest.raises(DataError, match=r"eval data not found: .*nowhere.*aghie.github.io/head-qa"):
        run_evaluation(cfg, tmp_path / "out")


def test_cli_help_and_print_config(capsys):
    assert cli_main(["--help"]) == 0
    assert "medsft eval" in capsys.readouterr().out
    assert cli_main(["--cfg", "model=tiny_random", "--compat-huatuo"]) == 0
    out = capsys.readouterr().out
    assert "compat_huatuo: true" in out and "tiny-random:llama" in out
    with pytest.raises(ConfigError, match="unknown option"):
        cli_main(["--bogus"])


def test_medsft_eval_tiny_subprocess(tmp_path, models_cache_dir, tiny_model_dir):
    """The real console entry point on 10 questions with the tiny random model (CPU)."""
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "medsft.cli", "eval", "model=tiny_random", f"model.cache_dir={models_cache_dir}",
        "eval=custom", f"eval.path={FIX / 'mini_mcq.json'}", "eval.limit=10", "eval.max_new_tokens=8",
        "eval.progress=false", f"eval.output_dir={out}", "eval.repetition_penalty=1.2", "--compat-huatuo",
    ]  # fmt: skip
    # this checkout's medsft, not whichever one is installed (cwd is tmp_path, so it is not on sys.path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300, env=env)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    preds, summary, md = read_outputs(out)
    assert len(preds) == 10
    for key in ("id", "question", "output", "extracted", "gold", "correct", "format_compliant", "compat_huatuo"):
        assert key in preds[0]
    bench = summary["benchmarks"]["mini_mcq"]
    assert bench["n"] == 10 and bench["mean_output_tokens"] <= 8
    assert set(bench["compat_huatuo"]) >= {"accuracy", "head", "tail", "n_dropped_empty", "label"}
    # every accuracy comes with its 95% Wilson interval, in summary.json and summary.md
    k = sum(p["correct"] for p in preds)
    assert bench["n_correct"] == k and bench["accuracy_ci95"] == accuracy_ci95(k, 10)
    lo, hi = bench["accuracy_ci95"]
    assert lo <= bench["accuracy"] <= hi and hi - lo > 0.2  # 10 questions: a wide interval
    overall = summary["overall"]
    assert overall["n"] == 10 and overall["accuracy_ci95"] == accuracy_ci95(k, 10)
    assert f"| mini_mcq | 10 | {ci_text(k, 10)} |" in md
    assert "95% Wilson score interval" in md
    assert "HuatuoGPT-compat (optimistic)" in md and "| mini_mcq | 10 |" in md
    assert summary["generation"]["repetition_penalty"] == 1.2 and "greedy, repetition penalty 1.2" in md
    assert "| mini_mcq | 10 |" in proc.stdout  # the table is printed too
    print(f"tiny eval (10 questions, subprocess): {seconds:.1f} s")


def test_medsft_eval_headqa_in_process(tmp_path, models_cache_dir, tiny_model_dir):
    """`medsft eval model=tiny_random eval=headqa_es eval.limit=...` on the shared HEAD-QA test split."""
    if not (SHARED / "headqa_es" / "test_HEAD.json").exists():
        pytest.skip(f"shared HEAD-QA not found under {SHARED}")
    cfg = compose_eval_config([
        f"model.path={tiny_model_dir}", "model.dtype=float32", "eval=headqa_es", f"eval.path={SHARED / 'headqa_es'}",
        "eval.limit=10", "eval.max_new_tokens=4", "eval.progress=false",
    ])  # fmt: skip  (model.path = a local model/checkpoint directory)
    out = run_evaluation(cfg, tmp_path / "out")
    preds, summary, md = read_outputs(out)
    assert Path(tiny_model_dir).name in summary["model"]["label"]
    bench = summary["benchmarks"]["headqa_es_test"]
    assert bench["n"] == 10 and bench["n_in_file"] == 2742 and bench["skipped"] == {"has image": 67}
    assert bench["accuracy_ci95"] == accuracy_ci95(bench["n_correct"], 10)
    assert summary["overall"]["accuracy_ci95"] == accuracy_ci95(bench["n_correct"], 10)
    assert all(p["gold"] in "ABCD" for p in preds) and "has image: 67" in md


def test_vllm_backend_absent_is_a_clear_error(tmp_path, tiny_model_dir):
    from medsft.eval.generate import vllm_available

    if vllm_available():
        pytest.skip("vllm is installed here")
    cfg = compose_eval_config([
        f"model.path={tiny_model_dir}", "eval=custom", f"eval.path={FIX / 'mini_mcq.json'}", "eval.backend=vllm",
    ])  # fmt: skip
    with pytest.raises(ConfigError, match="eval.backend=vllm needs the vllm package"):
        run_evaluation(cfg, tmp_path / "out")


def test_load_preset_items_for_training_loop():
    from medsft.eval.runner import load_preset_items

    eval_cfg = compose_eval_config(["eval=custom", "eval.limit=3", f"eval.path={FIX / 'mini_mcq.json'}"]).eval
    items = load_preset_items(eval_cfg)
    assert len(items) == 3 and items[0].language == "es"


@pytest.mark.slow
def test_medsft_eval_smollm2(tmp_path, smollm2_dir):
    """The embedded SmolLM2-135M-Instruct on 10 HuatuoGPT-format questions, greedy, 48 new tokens, CPU."""
    cfg = compose_eval_config([
        f"model.path={smollm2_dir}", "model.dtype=float32", "eval=custom", f"eval.path={FIX / 'mini_mcq.json'}",
        "eval.limit=10", "eval.max_new_tokens=48", "eval.batch_size=10", "eval.progress=false", "eval.compat_huatuo=true",
    ])  # fmt: skip
    out = run_evaluation(cfg, tmp_path / "out")
    preds, summary, _ = read_outputs(out)
    bench = summary["benchmarks"]["mini_mcq"]
    assert bench["n"] == 10 and len(preds) == 10
    assert bench["mean_output_chars"] > 20  # a real model writes text
    assert bench["unparsed"] + sum(p["extracted"] is not None for p in preds) == 10
    assert all(p["new_tokens"] <= 48 for p in preds)
    print(
        f"SmolLM2 10 questions: {bench['generation_seconds']:.1f} s, {bench['tokens_per_second']:.1f} tok/s, "
        f"accuracy {bench['accuracy']:.2f}, unparsed {bench['unparsed_rate']:.2f}, "
        f"compat {bench['compat_huatuo']['accuracy']:.2f}, format {bench['format_compliance']:.2f}"
    )
