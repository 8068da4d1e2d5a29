"""`medsft data ...` end to end: `check` and `sample` as subprocesses (exit codes), `stats` / `show` in process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_data_support import BROKEN, FIXTURES, REPO_ROOT, es_record, llama3_tokenizer, write_json  # noqa: E402

from medsft.cli.data import cli_main, fields_for  # noqa: E402


def medsft_data(*args, cwd=REPO_ROOT):
    proc = subprocess.run([sys.executable, "-m", "medsft.cli", "data", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


def test_check_valid_invalid_missing_and_preset():
    rc, out, err = medsft_data("check", FIXTURES / "es_small.json")
    assert rc == 0 and out.startswith("OK:") and "4 records" in out, (out, err)

    rc, out, err = medsft_data("check", BROKEN / "missing_field.json")
    assert rc == 1 and "#1 (line 8) missing 'Respuesta'" in err and "Traceback" not in err

    rc, out, err = medsft_data("check", BROKEN / "invalid_json.json")
    assert rc == 1 and "invalid JSON in record #1" in err and "Traceback" not in err

    rc, out, err = medsft_data("check", "does/not/exist.jsonl")
    assert rc == 1 and "does/not/exist.jsonl: no such file" in err and "Traceback" not in err

    english = BROKEN / "english_schema.json"
    rc, out, err = medsft_data("check", english)  # data.format=auto: HuatuoGPT-o1's keys are detected
    assert rc == 0 and "huatuo (detected)" in out, (out, err)
    rc, out, err = medsft_data("check", english, "--format", "medsft")
    assert rc == 1 and "--fields-preset huatuo_en" in err
    rc, out, err = medsft_data("check", english, "--fields-preset", "huatuo_en")
    assert rc == 0, err

    rc, out, err = medsft_data("check", english, "--fields-preset", "klingon")
    assert rc == 1 and "no such preset" in err and "huatuo_en" in err


def test_usage_errors_exit_2():
    rc, out, err = medsft_data("frobnicate")
    assert rc == 2 and "invalid choice" in err
    rc, out, err = medsft_data("sample", FIXTURES / "es_small.json")
    assert rc == 2 and "--out" in err


def test_sample_is_seeded_and_keeps_records_unchanged(tmp_path):
    src = write_json(tmp_path / "src.jsonl", [es_record(i, Extra=i) for i in range(20)], jsonl=True)
    out1, out2 = tmp_path / "a.json", tmp_path / "b.json"
    rc, out, err = medsft_data("sample", src, "--n", 5, "--out", out1, "--seed", 7)
    assert rc == 0, err
    assert medsft_data("sample", src, "--n", 5, "--out", out2, "--seed", 7)[0] == 0
    a = json.loads(out1.read_text(encoding="utf-8"))
    assert a == json.loads(out2.read_text(encoding="utf-8")) and len(a) == 5
    originals = [es_record(i, Extra=i) for i in range(20)]
    assert all(r in originals for r in a)  # every field kept, extra ones included
    assert medsft_data("check", out1)[0] == 0
    rc, out, err = medsft_data("sample", src, "--n", 5, "--out", src)
    assert rc == 1 and "is the input file" in err
    rc, out, err = medsft_data("sample", BROKEN / "missing_field.json", "--n", 1, "--out", tmp_path / "c.json")
    assert rc == 1 and "missing 'Respuesta'" in err


def test_fields_for_presets():
    assert fields_for("es").question == "Pregunta"
    en = fields_for("huatuo_en")
    assert (en.question, en.reasoning, en.response, en.source) == ("Question", "Complex_CoT", "Response", None)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    llama3_tokenizer().save_pretrained(d)
    return d


def test_stats_and_show_in_process(model_dir, tmp_path, capsys):
    path = write_json(tmp_path / "d.json", [es_record(i) for i in range(12)])
    # The test tokenizer is trained on the bundled records, so row lengths move with them: a limit below the
    # longest row and above the shortest is read from the rows themselves.
    assert cli_main(["stats", str(path), "--model", str(model_dir), "--no-cache", "--json", "data.val_ratio=0"]) == 0
    lengths = json.loads(capsys.readouterr().out)["total_tokens"]
    assert lengths["min"] < lengths["max"]
    limit = str(lengths["max"] - 1)
    rc = cli_main(["stats", str(path), "--model", str(model_dir), "--max-seq-len", limit, "--bsz", "2", "--accum", "2",
                   "--epochs", "3", "--no-cache", "--json", "data.val_ratio=0"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["records"] == 12
    assert out["prompt_tokens"]["max"] < out["total_tokens"]["min"]
    assert out["over_max_seq_len"] == round(out["over_max_seq_len_share"] * 12)
    assert out["examples_after_policy"] == 12 - out["over_max_seq_len"]
    k = out["examples_after_policy"]
    assert 0 < k < 12 and out["train_examples"] == k  # no validation split (data.val_ratio=0): all are trained
    assert out["steps_per_epoch"] == -(-(-(-k // 2)) // 2) and out["total_steps"] == 3 * out["steps_per_epoch"]

    rc = cli_main(["stats", str(path), "--model", str(model_dir), "--no-cache"])
    text = capsys.readouterr().out  # the demo preset's max_seq_len (what `python launch.py` composes)
    assert rc == 0 and "over max_seq_len=512: 0 of 12" in text and "optimizer steps: " in text

    rc = cli_main(["show", str(path), "--index", "3", "--model", str(model_dir), "--color", "never"])
    text = capsys.readouterr().out
    assert rc == 0
    body = text.split("\n", 2)[2]
    prompt, rest = body.split("[[", 1)
    loss, tail = rest.split("]]", 1)
    rec = es_record(3)
    assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n") and rec["Pregunta"] in prompt
    assert loss == (f"## Thinking\n\n{rec['Razonamiento_Complejo']}\n\n## Final Response\n\n{rec['Respuesta']}"
                    "<|eot_id|>")
    assert tail == "\n"

    rc = cli_main(["show", str(path), "--index", "3", "--model", str(model_dir), "--color", "always",
                   "--max-seq-len", "80", "--overlong", "truncate"])
    text = capsys.readouterr().out
    assert rc == 0 and "truncated at max_seq_len=80" in text
    trained = text.split("\033[1;32m")[-1].split("\033[0m")[0]
    assert trained.startswith("## Thinking") and "<|eot_id|>" not in trained  # cut response: no stop token

    assert cli_main(["show", str(path), "--index", "40", "--model", str(model_dir)]) == 1
    assert "no record #40" in capsys.readouterr().err
    assert cli_main(["stats", str(path), "--model", str(tmp_path / "no_model")]) == 1
    assert "no_model" in capsys.readouterr().err


def test_stats_counts_the_steps_of_the_run_the_config_composes(tiny_model_dir, capsys):
    """The step estimate is the run's own: the demo preset unless experiment= is named, its validation split,
    batch, accumulation and epochs (issue 16: it used to say 18 steps where the demo ran 40)."""
    demo = REPO_ROOT / "data" / "demo_data.json"
    # The tiny tokenizer writes longer rows than SmolLM2's, so the demo's 512 tokens would drop most records.
    assert cli_main(["stats", str(demo), "--model", tiny_model_dir, "data.max_seq_len=1024", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["experiment"] == "demo" and (out["train_examples"], out["val_examples"]) == (121, 11)
    assert (out["bsz"], out["accum"], out["world"], out["epochs"]) == (4, 1, 1, 2)
    assert (out["steps_per_epoch"], out["total_steps"]) == (31, 48)  # ceil(121 / 4) an epoch; train.max_steps=48 caps 62

    # A named preset: the seed's 1-GPU smoke test (10 samples, batch 1 x accumulation 8, one epoch, seq 1024).
    assert cli_main(["stats", str(demo), "experiment=local_test", "--model", tiny_model_dir]) == 0
    text = capsys.readouterr().out
    assert "config: experiment=local_test" in text and "the run: 10 training examples" in text
    assert "optimizer steps: 2 per epoch x 1 epochs = 2 (global batch 8 = 1 per device x 8 accumulation x 1" in text

    # Options still set single keys of that config, and the processes come from the launcher.
    assert cli_main(["stats", str(demo), "--model", tiny_model_dir, "data.max_seq_len=1024", "launcher=cpu_2proc",
                     "--epochs", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["world"], out["epochs"], out["global_batch"], out["total_steps"]) == (2, 1, 8, 16)

    assert cli_main(["stats", str(demo), "--model", tiny_model_dir, "train.n_epohcs=2"]) == 1
    assert "unknown config key 'train.n_epohcs'" in capsys.readouterr().err
