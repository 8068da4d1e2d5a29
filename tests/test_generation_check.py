"""The demo's before/after check (issue 11) on the tiny random model: it runs, reports and prints.

A tiny random model never writes the layout, so compliance is 0 here; what is tested is the machinery: the
held-out questions, the files, the metrics rows, the summary and the side-by-side print.
"""

import json
import logging
from pathlib import Path

import pytest
from train_utils import train_in_process

from medsft.config import validate
from medsft.errors import ConfigError
from medsft.train.generation_check import side_by_side
from medsft.outputs import read_records as read_metrics

ROOT = Path(__file__).resolve().parents[1]
DEMO = json.loads((ROOT / "data" / "demo_data.json").read_text(encoding="utf-8"))


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_before_after_check_runs_and_reports(tmp_path, capsys, caplog):
    with caplog.at_level(logging.INFO, logger="medsft.generation_check"):
        _, run_dir = train_in_process(
            tmp_path, "generation_check.enabled=true", "generation_check.num_questions=3",
            "generation_check.batch_size=2", "generation_check.max_new_tokens=8", "generation_check.show_chars=40",
            "generation_check.repetition_penalty=1.3",
        )
    out = capsys.readouterr().out

    files = {when: _rows(run_dir / f"generations_{when}.jsonl") for when in ("before", "after")}
    for rows in files.values():
        assert len(rows) == 3
        for row in rows:  # held-out records of the bundled file, answered and checked
            assert row["question"] == DEMO[row["index"]]["Pregunta"]
            assert isinstance(row["answer"], str) and row["compliant"] is False
    assert [r["index"] for r in files["before"]] == [r["index"] for r in files["after"]]

    records = read_metrics(run_dir / "metrics.jsonl")
    gen = {r["when"]: r for r in records if r["kind"] == "generation"}
    last_step = max(r["step"] for r in records if r["kind"] == "train")
    assert gen["before"]["step"] == 0 and gen["after"]["step"] == last_step
    for when, row in gen.items():
        assert row["n_questions"] == 3 and row["n_compliant"] == 0 and row["format_compliance"] == 0.0
        assert row["repetition_penalty"] == 1.3
        answers = [r["answer"] for r in files[when]]
        assert row["mean_answer_chars"] == pytest.approx(sum(map(len, answers)) / 3)
        languages = [r["language"] for r in files[when]]  # each answer's language, and their count
        assert set(languages) <= {"es", "en", "unknown"} and row["n_spanish"] == languages.count("es")

    summary = next(r for r in records if r["kind"] == "summary")
    assert summary["format_compliance_before"] == 0.0 and summary["format_compliance_after"] == 0.0
    assert summary["mean_answer_chars_after"] == gen["after"]["mean_answer_chars"]
    assert summary["answers_in_spanish_after"] == gen["after"]["n_spanish"] / 3
    assert summary["val_loss_drop"] == pytest.approx(1 - summary["val_loss_after"] / summary["val_loss_before"])
    assert summary["val_loss_after"] < summary["val_loss_before"]  # lr 3e-3 on the tiny model does learn

    # Printed: the side-by-side of the first held-out question, and the summary with the same figures.
    first = files["before"][0]
    assert "BASE MODEL (before)" in out and "FINE-TUNED (after)" in out
    assert "Held-out question: " + first["question"][:30] in out.replace("\n", " ")
    assert "format_compliance_before" in out and "val_loss_drop" in out
    assert "0% (0/3 held-out questions, greedy, repetition penalty 1.3), answers in Spanish" in caplog.text


@pytest.fixture(autouse=True)
def _wide_terminal(monkeypatch):
    """The side-by-side is as wide as the terminal (80..160 columns): the assertions read it at 120."""
    monkeypatch.setenv("COLUMNS", "120")


def test_side_by_side_cuts_each_answer():
    text = side_by_side("¿Pregunta?", "a" * 100, "## Thinking\n\nbreve", max_chars=30)
    lines = text.splitlines()
    assert "a" * 30 + " [... 70 more characters]" in text and "a" * 31 not in text
    assert any(line.rstrip().endswith("## Thinking") for line in lines)
    assert all(len(line) <= 160 for line in lines)
    assert "BASE MODEL (before): 100 characters" in text and "FINE-TUNED (after): 18 characters" in text
    assert "(empty answer: no characters)" in side_by_side("q", "", "x", 10)


def test_side_by_side_shows_whitespace_and_counts_it():
    """An answer of 384 newlines is shown as such, with the 384 characters the summary's mean counts (issue 16:
    it was "(empty answer)" next to "mean answer 384 chars")."""
    text = side_by_side("q", "\n" * 384, "  ## Thinking\n\n\n\n\nVeamos\n\n", max_chars=100)
    assert "(empty answer" not in text
    assert "BASE MODEL (before): 384 characters" in text and "(whitespace only, 384 characters: ⏎×384)" in text
    assert "FINE-TUNED (after): 26 characters" in text
    after = [line.split(" | ", 1)[1] for line in text.splitlines() if " | " in line][1:]
    assert after[:3] == ["[·×2] ## Thinking", "[⏎×5]", "Veamos [⏎×2]"]  # leading, inner and trailing runs
    assert "(whitespace only, 5 characters: ⏎×2 ·×2 →)" in side_by_side("q", "\n\n  \t", "x", 10)


@pytest.mark.parametrize("key", ["generation_check.repetition_penalty=0", "generation_check.repetition_penalty=-1"])
def test_repetition_penalty_must_be_positive(compose_config, key):
    with pytest.raises(ConfigError, match="generation_check.repetition_penalty"):
        validate(compose_config(*[key]))


def test_demo_preset_checks_every_held_out_question(compose_config):
    cfg = compose_config(*[])
    held_out = round(len(DEMO) * cfg.data.val_ratio)
    assert cfg.generation_check.num_questions == held_out >= 10  # >= 90% compliance means at most one miss
    assert cfg.generation_check.repetition_penalty == 1.0 and cfg.model.chunked_loss  # plain greedy (issue 20)
    assert compose_config(*["experiment=local_test"]).generation_check.repetition_penalty == 1.0


def test_bf16_inference_copy_leaves_the_training_weights_alone(tiny_model_dir):
    """The copy the check answers with under bf16 autocast: bf16 parameters, the same logits as the model cast
    to bf16, tied weights still tied, the fp32 original bitwise unchanged, and accelerate's autocast wrapper of
    the instance's forward gone from the copy (it would keep every activation cast as under autocast)."""
    import torch
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    from medsft.train.generation_check import bf16_inference_copy

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    model.model.layers[0].compile(dynamic=True)  # model.compile=true: the copy must not reuse the compiled layer
    model = Accelerator(cpu=True, mixed_precision="bf16").prepare(model)
    assert "forward" in model.__dict__  # accelerate wraps the instance's forward in autocast
    before = {k: v.clone() for k, v in model.state_dict().items()}

    clone = bf16_inference_copy(model)
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in clone.parameters())
    assert "forward" not in clone.__dict__ and "forward" in model.__dict__
    assert clone.model.layers[0]._compiled_call_impl is None and model.model.layers[0]._compiled_call_impl
    assert clone.get_output_embeddings().weight is clone.get_input_embeddings().weight
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        got = clone(input_ids=ids).logits
        reference = type(model)(model.config)
        reference.load_state_dict(before)
        for param in reference.parameters():  # parameters in bf16, buffers (RoPE frequencies) kept in fp32
            param.data = param.data.to(torch.bfloat16)
        want = reference(input_ids=ids).logits
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("precision,answer_dtype", [("bf16", "torch.bfloat16"), ("no", "torch.float32")])
def test_the_check_answers_in_the_training_precision(tmp_path, monkeypatch, precision, answer_dtype):
    """bf16 autocast training: the answers come from bf16 weights (as `medsft eval` of the checkpoint would give);
    fp32 training answers from the fp32 model itself."""
    import medsft.train.generation_check as gc

    seen = []
    real = gc.generate_responses

    def spy(model, *args, **kwargs):
        seen.append(str(next(model.parameters()).dtype))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(gc, "generate_responses", spy)
    train_in_process(tmp_path, "generation_check.enabled=true", "generation_check.num_questions=2",
                     "generation_check.max_new_tokens=4", f"train.mixed_precision={precision}")
    assert seen == [answer_dtype, answer_dtype]  # before and after training
