"""The SFT loop on the real tiny random model: learning, LR curve, loss normalisation, checkpoints, secrets."""

from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path

import pytest
import torch

from medsft.train import checkpoint as ckpt
from medsft.compute.kernels import token_loss_sums
from medsft.outputs import read_records as read_metrics
from train_utils import ROOT, RecordingHub, launch, reset_accelerate, tiny_overrides, train_in_process


def _records(run_dir: Path, kind: str) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == kind]


def test_loss_decreases_and_val_loss_falls(tmp_path):
    objective, run_dir = train_in_process(tmp_path, "train.n_epochs=3")
    train = _records(run_dir, "train")
    first, last = train[0]["loss"], train[-1]["loss"]
    assert last < 0.85 * first, (first, last)  # tiny random model: ~6.2 -> ~5.05, then a plateau
    assert max(r["loss"] for r in train[-5:]) < min(r["loss"] for r in train[:3]), train  # not one lucky step
    summary = _records(run_dir, "summary")[-1]
    assert summary["val_loss_after"] < summary["val_loss_before"]
    assert objective == pytest.approx(summary["val_loss_after"])
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for record in train:
        assert 0.0 <= record["token_acc"] <= 1.0
        assert record["tokens_per_s"] > 0 and record["grad_norm"] is not None


def test_logged_lr_follows_warmup_then_cosine(tmp_path):
    _, run_dir = train_in_process(tmp_path, "train.n_epochs=2", "optimizer.warmup_rates=0.25",
                                  "optimizer.learning_rate=1e-3", "train.train_bsz_per_gpu=2")
    train = _records(run_dir, "train")
    total = len(train)
    assert [r["step"] for r in train] == list(range(1, total + 1))
    warmup = math.ceil(0.25 * total)
    for record in train:
        s = record["step"] - 1
        if s < warmup:
            expected = 1e-3 * (s + 1) / warmup
        else:
            expected = 1e-3 * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup)))
        assert record["lr"] == pytest.approx(expected, rel=1e-9, abs=1e-15)
    assert max(r["lr"] for r in train) == pytest.approx(1e-3)


def _first_step(tmp_path, name, *extra):
    _, run_dir = train_in_process(tmp_path / name, "train.max_steps=1", "optimizer.max_grad_norm=1e9",
                                  "data.val_ratio=0", "checkpoint.save_final=false",
                                  "checkpoint.save_at_epoch_end=false", *extra)
    return _records(run_dir, "train")[0]


def test_loss_is_the_token_mean_of_the_whole_step(compose_config, tmp_path):
    """Two micro-batches of one example each must give the loss and gradient of one batch of two."""
    # A briefly trained model, so examples differ in per-token loss (a random one is uniform everywhere).
    train_in_process(tmp_path / "warm", "train.n_epochs=2", "data.val_ratio=0")
    warm = str(ckpt.latest_complete_checkpoint(tmp_path / "warm" / "ckpts" / "tiny"))
    # A long trained-on record (low loss) and a short gibberish one (high loss): their means differ.
    pair = tmp_path / "pair.json"
    seen = json.loads((ROOT / "data" / "demo_data.json").read_text(encoding="utf-8"))[0]
    # Bytes the tokenizer never saw in training get very low probability from the trained model.
    odd = {"Pregunta": "¿Qué?", "Razonamiento_Complejo": "ЖЩЫ ЖЩЫ ЖЩЫ", "Respuesta": "ЩЖЫ ЖЫЩ"}
    pair.write_text(json.dumps([seen, odd], ensure_ascii=False), encoding="utf-8")
    common = (f"model.path={warm}", f"data.path={pair}")
    whole = _first_step(tmp_path, "whole", *common, "train.train_bsz_per_gpu=2", "train.gradient_accumulation_steps=1")
    split = _first_step(tmp_path, "split", *common, "train.train_bsz_per_gpu=1", "train.gradient_accumulation_steps=2")
    assert split["loss_tokens"] == whole["loss_tokens"]
    assert split["loss"] == pytest.approx(whole["loss"], rel=1e-5)
    assert split["grad_norm"] == pytest.approx(whole["grad_norm"], rel=1e-4)

    # Hand computation on the same two examples with a fresh copy of the model.
    from medsft.data.collate import SFTCollator
    from medsft.data.dataset import build_sft_data
    from medsft.models import load_model, load_tokenizer
    from medsft.data.order import rank_micro_batches
    from medsft.data.order import StepPlan

    cfg = compose_config(*tiny_overrides(tmp_path, *common, "data.val_ratio=0", "train.train_bsz_per_gpu=2"))
    tokenizer = load_tokenizer(cfg.model)
    data = build_sft_data(cfg.data, tokenizer, seed=cfg.seed)
    plan = StepPlan(len(data.train), 2, 1, 1, 1)
    indices = rank_micro_batches(plan, cfg.seed, 0, 0)[0]
    torch.manual_seed(0)
    model = load_model(cfg.model, dtype=torch.float32)
    collate = SFTCollator(pad_token_id=tokenizer.pad_token_id)
    losses, tokens = [], []
    for i in indices:  # one example at a time: no padding involved
        batch = collate([data.train[i]])
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss_sum, n_tokens, _ = token_loss_sums(logits, batch["labels"])
        losses.append(float(loss_sum))
        tokens.append(int(n_tokens))
    assert tokens[0] != tokens[1], "pick examples of different lengths to tell token-mean from mean-of-means"
    assert whole["loss"] == pytest.approx(sum(losses) / sum(tokens), rel=1e-5)
    mean_of_means = (losses[0] / tokens[0] + losses[1] / tokens[1]) / 2
    assert abs(whole["loss"] - mean_of_means) > 0.02 * whole["loss"]


def test_checkpoints_rotate_and_only_complete_ones_count(tmp_path):
    _, run_dir = train_in_process(tmp_path, "train.n_epochs=2", "checkpoint.every_n_steps=3", "checkpoint.max_ckpts=2")
    root = tmp_path / "ckpts" / "tiny"
    complete = ckpt.list_complete_checkpoints(root)
    assert len(complete) == 2
    total_steps = _records(run_dir, "train")[-1]["step"]
    assert ckpt.read_trainer_state(complete[-1])["global_step"] == total_steps
    assert not list(root.glob(".tmp-*"))
    for path in complete:
        for name in ("config.json", "model.safetensors", "tokenizer_config.json", "generation_config.json",
                     ckpt.STATE_FILE, ckpt.CONFIG_FILE, ckpt.COMPLETE_MARKER):
            assert (path / name).is_file(), name
        assert (path / ckpt.TRAINING_STATE_DIR).is_dir()
    # An incomplete folder (killed mid-save) is never picked as the newest.
    fake = root / "checkpoint-9-999"
    fake.mkdir()
    assert ckpt.latest_complete_checkpoint(root) == complete[-1]


def test_checkpoint_reloads_with_identical_logits(compose_config, tmp_path):
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medsft.models import load_model, load_tokenizer

    reset_accelerate()
    cfg = compose_config(*tiny_overrides(tmp_path))
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, dtype=torch.float32)
    with torch.no_grad():  # move away from the saved random init so the test sees trained weights
        for param in model.parameters():
            param.add_(0.01 * torch.randn_like(param))
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    path = ckpt.save_checkpoint(accelerator, model, tokenizer, tmp_path / "c", 0, 7, {"global_step": 7}, cfg)
    reloaded = AutoModelForCausalLM.from_pretrained(path)
    reloaded_tokenizer = AutoTokenizer.from_pretrained(path)
    assert reloaded_tokenizer.chat_template == tokenizer.chat_template
    ids = reloaded_tokenizer("## Thinking\n\nDolor torácico opresivo", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = accelerator.unwrap_model(model)(ids).logits
        got = reloaded(ids).logits
    assert torch.equal(expected, got)
    reset_accelerate()


def test_gradient_checkpointing_is_really_enabled(compose_config, tmp_path):
    from medsft.train.loop import _cleanup, setup

    reset_accelerate()
    cfg = compose_config(*tiny_overrides(tmp_path, "model.gradient_checkpointing=true"))
    ctx = setup(cfg, tmp_path)
    try:
        unwrapped = ctx.accelerator.unwrap_model(ctx.model)
        assert unwrapped.is_gradient_checkpointing
        assert unwrapped.config.use_cache is False
    finally:
        _cleanup(ctx)
        reset_accelerate()


def test_secrets_never_land_on_disk_and_hub_failures_are_not_fatal(tmp_path):
    fake_hf = "hf_FAKEtokenFORtestsONLY1234567890"
    fake_wandb = "0123456789abcdef0123456789abcdef01234567"
    env = {**os.environ, "HF_TOKEN": fake_hf, "WANDB_API_KEY": fake_wandb, "HF_HUB_OFFLINE": "1",
           "WANDB_MODE": "offline"}
    overrides = [o for o in tiny_overrides(tmp_path) if not o.startswith("logging=")]
    result = launch(*overrides, "logging=wandb_offline", "push_to_hub=true", "hf_repo_id=someone/medsft-test",
                    "train.max_steps=2", f"hydra.run.dir={tmp_path / 'run'}", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    # The offline push (huggingface_hub's background upload) was reported, and training finished.
    assert "push of checkpoint-" in result.stdout + result.stderr and "failed:" in result.stdout + result.stderr
    assert list((tmp_path / "logs" / "tiny" / "wandb").glob("offline-run-*"))
    leaked = []
    for path in tmp_path.rglob("*"):
        if path.is_file():
            blob = path.read_bytes()
            if fake_hf.encode() in blob or fake_wandb.encode() in blob:
                leaked.append(str(path))
    assert not leaked


def test_hub_pusher_uploads_in_the_background_with_the_model_card(tmp_path):
    from medsft.tracking import HubPusher

    folder = tmp_path / "checkpoint-0-5"
    (folder / "training_state").mkdir(parents=True)
    for name in ("model.safetensors", "config.json", "COMPLETE", "training_state/optimizer.bin"):
        (folder / name).write_text("x", encoding="utf-8")
    api = RecordingHub()
    pusher = HubPusher("me/model", private=True, api=api)
    pusher.submit(folder, "step 5", card="# card at step 5")
    time.sleep(0.2)
    assert not any(c[0] == "upload_folder" for c in api.calls)  # submit returned; the upload is still held
    pusher.update_card("# final card", "final")
    api.release.set()
    pusher.close(timeout_s=30)
    assert [c[0] for c in api.calls] == ["create_repo", "upload_folder", "upload_file"]  # in submission order
    assert api.calls[0] == ("create_repo", "me/model", True)
    _, name, files, card = api.calls[1]
    assert name == "checkpoint-0-5" and card == "# card at step 5"
    assert files == ["README.md", "config.json", "model.safetensors"]  # no training state, no COMPLETE marker
    assert api.calls[2] == ("upload_file", "README.md", "# final card")
    assert pusher.pushed == ["checkpoint-0-5"] and not pusher.errors

    failing = RecordingHub(fail=True)
    failing.release.set()
    pusher = HubPusher("me/model", api=failing)
    pusher.submit(folder, "step 5")
    pusher.close(timeout_s=30)  # never raises: reported
    assert pusher.errors == ["push of checkpoint-0-5 to me/model failed: ConnectionError: hub unreachable"]


def test_model_card_says_base_data_command_metrics_and_layout(compose_config):
    from medsft.tracking import model_card

    cfg = compose_config("~experiment", "model.path=meta-llama/Llama-3.2-1B-Instruct", "data=custom_es",
                         "data.path=train.json", "hf_repo_id=me/medico", "push_to_hub=true")
    records = [{"kind": "val", "step": 0, "val_loss": 3.7}, {"kind": "train", "step": 40, "loss": 2.1},
               {"kind": "val", "step": 40, "val_loss": 2.36},
               {"kind": "generation", "when": "after", "n_compliant": 11, "n_questions": 11},
               {"kind": "checkpoint_eval", "step": 40, "benchmark": "headqa_es", "n": 50, "accuracy": 0.3,
                "accuracy_ci95": [0.191, 0.438]},
               {"kind": "summary", "tokens_per_s": 812.4, "wall_time_s": 437.0}]
    card = model_card(cfg, records, {"train_examples": 77, "val_examples": 11, "total_steps": 40, "step": 40},
                      "python launch.py data=custom_es data.path=train.json", checkpoint="checkpoint-1-40", final=True)
    assert card.startswith("---\nbase_model: meta-llama/Llama-3.2-1B-Instruct\n")
    assert "language:\n- es" in card and "# me/medico" in card
    assert "`checkpoint-1-40`, step 40 of 40 (final)" in card
    assert "file: `train.json` (preset `data=custom_es`)" in card and "77 training examples, 11 held out" in card
    assert "python launch.py data=custom_es data.path=train.json" in card
    assert "| validation loss, step 0 -> 40 | 3.7000 -> 2.3600 |" in card
    assert "| layout followed after training (held-out questions) | 11/11 |" in card
    assert "| headqa_es accuracy, 50 questions, step 40 | 30.0% [19.1, 43.8] (95% Wilson) |" in card
    assert "betas [0.9, 0.999]" in card  # the seed's AdamW
    assert "## Thinking\n\n<reasoning>\n\n## Final Response\n\n<answer>" in card
    assert 'AutoModelForCausalLM.from_pretrained("me/medico")' in card
    local = compose_config("model=tiny_random", "hf_repo_id=me/x")
    assert "base_model" not in model_card(local, [], {}, "python launch.py")  # not a Hub id: no base_model


def test_launch_end_to_end_prints_where_outputs_are(tmp_path):
    overrides = [o for o in tiny_overrides(tmp_path) if o != "logging.progress_bar=false"]
    result = launch(*overrides, "train.max_steps=3", "checkpoint.every_n_steps=1", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr[-3000:]
    out, both = result.stdout, result.stdout + result.stderr
    assert "medsft run summary" in out and "latest checkpoint" in out and "run directory" in out
    assert (tmp_path / "run" / ".hydra" / "config.yaml").is_file()
    assert (tmp_path / "run" / "metrics.jsonl").is_file()
    latest = ckpt.latest_complete_checkpoint(tmp_path / "ckpts" / "tiny")
    assert latest is not None and str(latest) in out

    # The summary's cost figures, in metrics.jsonl and on the console (issue 16).
    summary = _records(tmp_path / "run", "summary")[-1]
    train = _records(tmp_path / "run", "train")
    assert summary["train_tokens"] == sum(r["tokens"] for r in train)  # every real token of the 3 steps
    assert 0 < summary["train_time_s"] < summary["wall_time_s"]
    # train_time_s is rounded to the millisecond: the ratio agrees to that precision
    assert summary["tokens_per_s"] == pytest.approx(summary["train_tokens"] / summary["train_time_s"],
                                                    rel=0.002 / summary["train_time_s"] + 1e-3)
    assert summary["peak_memory_gb"] > 0.05 and summary["peak_memory_kind"] == "process_rss"
    for label in ("wall time", "throughput", "peak memory"):
        assert re.search(rf"^  {label}\s+\S", out, re.M), out
    assert re.search(r"tok/s \(\d[\d,]* tokens in [\d.]+ s of optimizer steps\)", out)
    assert re.search(r"\d+/3 \[[\d:]+<[\d:]+, .*tok/s\]", result.stderr), result.stderr[-2000:]  # the bar: ETA, tok/s

    # Quiet checkpoints: three saves, none of accelerate's per-save lines, no DeepSpeed CPU notice.
    assert both.count("checkpoint saved:") == 3
    for noise in ("Saving current state", "Model weights saved in", "Optimizer state saved", "Random states saved",
                  "Removed shared tensor", "Setting accelerator to CPU", "Writing model shards"):
        assert noise not in both, noise


def test_the_quiet_filters_drop_only_what_they_name():
    import logging

    from medsft.runtime.quiet import quiet_third_party_logs

    quiet_third_party_logs()
    quiet_third_party_logs()  # idempotent
    shared = logging.getLogger("accelerate.utils.other")
    assert len(shared.filters) == 1

    def passes(logger, level, message):
        return logger.filter(logging.LogRecord(logger.name, level, __file__, 1, message, None, None))

    assert not passes(shared, logging.WARNING, "Removed shared tensor {'lm_head.weight'} while saving. This ...")
    assert passes(shared, logging.WARNING, "Removed shared tensor {'model.layers.0.mlp.up_proj.weight'} while saving")
    assert passes(shared, logging.WARNING, "Removed shared tensor {'lm_head.weight', 'encoder.w'} while saving")
    saves = logging.getLogger("accelerate.checkpointing")
    assert not passes(saves, logging.INFO, "Optimizer state saved in /x/optimizer.bin")
    assert passes(saves, logging.WARNING, "Could not load the optimizer state")
    accel = logging.getLogger("accelerate.accelerator")
    assert not passes(accel, logging.INFO, "Saving current state to /x/training_state")
    assert passes(accel, logging.INFO, "Something else entirely")
    ds = logging.getLogger("DeepSpeed")
    assert not passes(ds, logging.WARNING, "Setting accelerator to CPU. If you have GPU or other accelerator, ...")
    assert passes(ds, logging.WARNING, "Setting ds_accelerator to cuda (auto detect)")


def test_bad_data_fails_cleanly_and_writes_no_checkpoint(tmp_path):
    bad = tmp_path / "bad.json"
    records = json.loads((ROOT / "data" / "demo_data.json").read_text(encoding="utf-8"))[:5]
    del records[3]["Respuesta"]
    bad.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    result = launch(*tiny_overrides(tmp_path), f"data.path={bad}", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode != 0
    assert str(bad) in result.stderr and "Respuesta" in result.stderr and "#3" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "ckpts").exists()


def test_each_checkpoint_gets_a_small_benchmark_eval(tmp_path):
    from medsft.paths import shared_data_dir

    shared = shared_data_dir() / "headqa_es"
    if not shared.is_dir():
        pytest.skip(f"HEAD-QA data not found at {shared}")
    _, run_dir = train_in_process(tmp_path, "train.max_steps=2", "checkpoint.every_n_steps=2",
                                  "checkpoint.eval_benchmark=headqa_es", "checkpoint.eval_limit=3",
                                  "checkpoint.eval_max_new_tokens=8")
    evals = _records(run_dir, "checkpoint_eval")
    assert evals and evals[0]["step"] == 2 and evals[0]["benchmark"] == "headqa_es"
    assert evals[0]["n"] == 3 and 0.0 <= evals[0]["accuracy"] <= 1.0


def test_non_finite_gradients_from_a_finite_loss_skip_the_step(tmp_path, monkeypatch):
    from medsft.testing import faults

    monkeypatch.setenv(faults.ENV, "nan_grad_at_steps=2")
    _, run_dir = train_in_process(tmp_path, "train.max_steps=4", "train.train_bsz_per_gpu=2")
    train = _records(run_dir, "train")
    assert [r["skipped_total"] for r in train] == [0, 1, 1, 1]
    assert all(math.isfinite(r["loss"]) for r in train)
    latest = ckpt.latest_complete_checkpoint(tmp_path / "ckpts" / "tiny")
    from safetensors.torch import load_file

    weights = load_file(str(latest / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())
