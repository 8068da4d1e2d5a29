"""Everything that can be checked before training is checked before training, each failure one clear message
naming the key / path and a documented exit code: numeric ranges, checkpoint.eval_benchmark, output locations,
incomplete model folders; a tokenizer without a chat template trains (its embeddings grow); a SIGTERM during
start-up exits 75."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from medsft.config import validate
from medsft.errors import ConfigError, DataError, ModelSourceError, OutputError
from medsft.models import check_model_source, load_model, load_tokenizer
from medsft.runtime.startup import PREEMPTED_EXIT_CODE
from medsft.runtime.workspace import check_output_locations
from medsft.train.checkpoint_eval import prepare_checkpoint_eval
from train_utils import ROOT, launch, tiny_overrides, train_in_process


# ----------------------------------------------------------------------------------------------- numbers


@pytest.mark.parametrize("override,needle", [
    ("optimizer.learning_rate=nan", "optimizer.learning_rate=nan must be a finite number"),
    ("optimizer.learning_rate=inf", "optimizer.learning_rate=inf must be a finite number"),
    ("optimizer.learning_rate=1e12", "optimizer.learning_rate=1000000000000.0 must be in (0, 1]"),
    ("optimizer.learning_rate=0", "optimizer.learning_rate=0.0 must be in (0, 1]"),
    ("optimizer.betas=[0.9,1.0]", "optimizer.betas=[0.9, 1.0] must be two numbers in [0, 1)"),
    ("optimizer.betas=[-0.1,0.9]", "optimizer.betas=[-0.1, 0.9] must be two numbers in [0, 1)"),
    ("optimizer.betas=[0.9]", "optimizer.betas=[0.9] must be two numbers"),
    ("optimizer.eps=-1e-8", "optimizer.eps=-1e-08 must be > 0"),
    ("seed=-1", "seed=-1 must be in [0, 4294967295]"),
    ("seed=4294967296", "seed=4294967296 must be in [0, 4294967295]"),
    ("optimizer.max_grad_norm=-1", "optimizer.max_grad_norm=-1.0 must be >= 0 (0 = measured, not clipped)"),
    ("optimizer.max_grad_norm=nan", "optimizer.max_grad_norm=nan must be a finite number"),
    ("optimizer.weight_decay=-0.1", "optimizer.weight_decay=-0.1 must be >= 0"),
    ("generation_check.num_questions=-1", "generation_check.num_questions=-1 must be >= 1"),
    ("generation_check.max_new_tokens=0", "generation_check.max_new_tokens=0 must be >= 1"),
    ("train.max_consecutive_skips=0", "train.max_consecutive_skips=0 must be >= 1"),
    ("train.cpu_malloc_mmap_threshold_mb=64", "train.cpu_malloc_mmap_threshold_mb=64 must be in [0, 32]"),
    ("checkpoint.eval_limit=-5", "checkpoint.eval_limit=-5 must be >= 0"),
    ("data.num_workers=-1", "data.num_workers=-1 must be >= 0"),
    ("launcher.main_process_port=70000", "launcher.main_process_port=70000 must be in [0, 65535]"),
    ("launcher.machine_rank=1", "launcher.machine_rank=1 must be in [0, launcher.num_machines=1)"),
    ("model.tiny.hidden_size=0", "model.tiny.hidden_size=0 must be >= 1"),
    ("checkpoint.eval_benchmark=nope", "checkpoint.eval_benchmark='nope' is not a conf/eval preset"),
    ("output_dir=''", "output_dir is empty"),
])
def test_every_numeric_range_is_checked_naming_the_key(compose_config, override, needle):
    with pytest.raises(ConfigError) as refused:
        validate(compose_config("~experiment", override))
    assert needle in str(refused.value)


def test_rl_numbers_must_be_finite_too(compose_config):
    with pytest.raises(ConfigError, match=r"rl.max_grad_norm=nan must be a finite number"):
        validate(compose_config("stage=rl", "rl=grpo", "rl.max_grad_norm=nan"))


def test_checkpoint_eval_benchmark_is_resolved_at_start_up(compose_config, monkeypatch, tmp_path):
    with pytest.raises(ConfigError, match="checkpoint.eval_benchmark=custom: .*eval.path"):
        prepare_checkpoint_eval(compose_config("checkpoint.eval_benchmark=custom"))
    monkeypatch.setenv("MEDSFT_SHARED_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="checkpoint.eval_benchmark=headqa_es: eval data not found"):
        prepare_checkpoint_eval(compose_config("checkpoint.eval_benchmark=headqa_es"))
    assert prepare_checkpoint_eval(compose_config()) is None  # off by default


# ----------------------------------------------------------------------------------------------- outputs


def test_an_output_dir_that_is_a_file_fails_before_the_data_is_read(tmp_path, caplog):
    (tmp_path / "ckpts").write_text("not a folder")
    with pytest.raises(OutputError, match=f"output_dir/experiment_name: {tmp_path / 'ckpts'} is a file"):
        train_in_process(tmp_path)
    assert "records" not in caplog.text  # the data was never read


def _unshare_works() -> bool:
    if not shutil.which("unshare"):
        return False
    return subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o ro,size=1m tmpfs /mnt"],
                          capture_output=True, timeout=30).returncode == 0


@pytest.mark.skipif(not _unshare_works(), reason="needs user namespaces (unshare -rm) to mount a read-only tmpfs")
def test_read_only_output_and_log_dirs_are_refused_at_start_up(tmp_path):
    readonly = tmp_path / "ro"
    readonly.mkdir()
    code = textwrap.dedent(f"""
        from medsft.config import compose
        from medsft.errors import OutputError
        from medsft.runtime.workspace import check_output_locations
        for key in ("output_dir", "log_dir"):
            cfg = compose(["~experiment", f"{{key}}={readonly}/sub", "logging=wandb_offline"])
            try:
                check_output_locations(cfg, None)
                print("ACCEPTED", key)
            except OutputError as err:
                print("REFUSED", err)
    """)
    mount = f'mount -t tmpfs -o ro tmpfs "{readonly}" && exec "$0" -c "$1"'
    done = subprocess.run(["unshare", "-rm", "sh", "-c", mount, sys.executable, code], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith("REFUSED") for line in lines), done.stdout
    assert "output_dir/experiment_name" in lines[0] and "log_dir" in lines[1] and "not a writable" in lines[1]


def test_output_locations_are_created_and_probed(compose_config, tmp_path):
    cfg = compose_config(*tiny_overrides(tmp_path), "logging=wandb_offline")
    created = check_output_locations(cfg, tmp_path / "run")
    assert (tmp_path / "ckpts" / "tiny").is_dir() and (tmp_path / "logs" / "tiny").is_dir()
    assert tmp_path / "ckpts" in created and list((tmp_path / "ckpts" / "tiny").iterdir()) == []


def test_a_file_system_error_anywhere_becomes_one_message_naming_the_file(tmp_path):
    import errno

    from medsft.errors import output_error_from_os_error

    full = output_error_from_os_error(OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "m.jsonl")))
    assert isinstance(full, OutputError) and str(full).startswith(f"cannot write {tmp_path / 'm.jsonl'}: no space")
    wrapped = RuntimeError("saving failed")
    wrapped.__cause__ = PermissionError(errno.EACCES, "Permission denied", "/x/y")
    assert "cannot use /x/y: permission denied" in str(output_error_from_os_error(wrapped))
    assert output_error_from_os_error(ValueError("a bug")) is None  # not the user's: its traceback stays


# ----------------------------------------------------------------------------------------------- model folders


@pytest.fixture
def broken_models(tmp_path, tiny_model_dir) -> dict[str, Path]:
    def copy(name: str) -> Path:
        path = tmp_path / name
        shutil.copytree(tiny_model_dir, path)
        return path

    only_config = tmp_path / "only-config"
    only_config.mkdir()
    shutil.copy(Path(tiny_model_dir) / "config.json", only_config)
    truncated = copy("truncated")
    with (truncated / "model.safetensors").open("r+b") as handle:
        handle.truncate(100_000)
    no_weights = copy("no-weights")
    (no_weights / "model.safetensors").unlink()
    no_tokenizer = copy("no-tokenizer")
    (no_tokenizer / "tokenizer.json").unlink()
    return {"only-config": only_config, "truncated": truncated, "no-weights": no_weights,
            "no-tokenizer": no_tokenizer}


@pytest.mark.parametrize("name,expected", [
    ("only-config", {check_model_source: ["no tokenizer", "no weights"], load_tokenizer: ["no tokenizer"],
                     load_model: ["no weights"]}),
    ("truncated", {check_model_source: ["model.safetensors is truncated"],
                   load_model: ["model.safetensors is truncated"]}),
    ("no-weights", {check_model_source: ["no weights (model.safetensors"], load_model: ["no weights"]}),
    ("no-tokenizer", {check_model_source: ["no tokenizer"], load_tokenizer: ["no tokenizer"]}),
])
def test_an_incomplete_model_folder_is_named_with_what_is_missing(tiny_model_cfg, broken_models, name, expected):
    tiny_model_cfg.path = str(broken_models[name])
    for attempt, needles in expected.items():
        with pytest.raises(ModelSourceError) as refused:
            attempt(tiny_model_cfg)
        message = str(refused.value)
        assert f"model.path={broken_models[name]}" in message and "not a local directory" not in message, message
        assert all(needle in message for needle in needles), (attempt.__name__, message)


def _model_without_chat_template(folder: Path) -> Path:
    """A folder whose tokenizer has no chat template and a vocabulary without the Llama-3 control tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [json.dumps(r, ensure_ascii=False) for r in json.loads((ROOT / "data" / "demo_data.json").read_text())]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024, bos_token_id=1,
                         eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def test_a_tokenizer_without_chat_template_or_llama3_tokens_trains(tmp_path):
    model_dir = _model_without_chat_template(tmp_path / "no-template")
    assert "<|eot_id|>" not in json.loads((model_dir / "tokenizer.json").read_text())["model"]["vocab"]
    train_in_process(tmp_path, f"model.path={model_dir}", "train.max_steps=1", "data.max_samples=8",
                     "data.val_ratio=0", "data.max_seq_len=256", "data.overlong=truncate", "logging.plot=false")
    from medsft.train import checkpoint as ckpt
    from transformers import AutoModelForCausalLM, AutoTokenizer

    saved = ckpt.latest_complete_checkpoint(tmp_path / "ckpts" / "tiny")
    tokenizer = AutoTokenizer.from_pretrained(saved)
    model = AutoModelForCausalLM.from_pretrained(saved)
    assert "<|eot_id|>" in tokenizer.get_vocab() and tokenizer.chat_template
    assert model.get_input_embeddings().num_embeddings == len(tokenizer) > 400


# ----------------------------------------------------------------------------------------------- end to end


def _until(proc: subprocess.Popen, needle: str, timeout: float) -> str:
    seen, deadline = [], time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if needle in line:
            return "".join(seen)
    raise AssertionError(f"{needle!r} not seen:\n" + "".join(seen)[-3000:])


@pytest.mark.slow
def test_sigterm_during_start_up_exits_75_with_a_message(tmp_path, models_cache_dir, tiny_model_dir):
    args = [sys.executable, str(ROOT / "launch.py"), *tiny_overrides(tmp_path), f"model.cache_dir={models_cache_dir}",
            f"hydra.run.dir={tmp_path / 'run'}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    for moment in ("imports", "setup"):
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        try:
            if moment == "imports":
                time.sleep(0.5)  # importing torch takes seconds: still in it
                seen = ""
            else:
                seen = _until(proc, "processes: 1", timeout=300)  # the loop's setup has begun (data, model)
            proc.send_signal(signal.SIGTERM)
            rest, _ = proc.communicate(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
        out = seen + rest
        assert proc.returncode == PREEMPTED_EXIT_CODE, (moment, proc.returncode, out[-3000:])
        assert "Traceback" not in out and ("SIGTERM" in out or "preempted" in out), out[-3000:]


@pytest.mark.slow
def test_a_user_error_at_start_up_is_one_message_and_its_exit_code(tmp_path):
    (tmp_path / "ckpts").write_text("a file where the checkpoints should go")
    done = launch(*tiny_overrides(tmp_path), f"hydra.run.dir={tmp_path / 'run'}")
    assert done.returncode == OutputError.exit_code == 6, done.stderr[-3000:]
    assert f"medsft: error: output_dir/experiment_name: {tmp_path / 'ckpts'} is a file" in done.stderr
    assert "Traceback" not in done.stderr and "records" not in done.stdout + done.stderr
