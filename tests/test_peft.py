"""Parameter-efficient fine-tuning (peft=lora|dora|qlora) on the real loop with the tiny random Llama: the loss
falls, only the adapter changes, checkpoints hold the adapter (peft's format, no frozen base) and resume
bitwise after SIGKILL, 2-process DDP and ZeRO-3 match one process and save the real gathered adapter, the
merge equals base+adapter, and bad settings (QLoRA on CPU, a wrong target name) fail at start-up naming the key.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from medsft.compute.kernels import Kernels, forward_loss_sums, setup_kernels
from medsft.errors import ConfigError
from medsft.models import apply_peft, load_model
from medsft.outputs import read_records
from medsft.testing.faults import ENV as FAULTS
from medsft.train import checkpoint as ckpt
from medsft.train.optim import param_groups
from train_utils import ROOT, RecordingHub, compose_cfg, launch, reset_accelerate, tiny_overrides, train_in_process

LORA = ("peft=lora", "optimizer.learning_rate=1e-2")
MERGE_TOLERANCE = 1e-5  # max abs logit difference, merged model vs base+adapter, float32 (README: the same)


def _cache(tiny_model_dir: str) -> str:
    """The session's models folder, so that checkpoints name `tiny_model_dir` as their base."""
    return f"model.cache_dir={Path(tiny_model_dir).parent}"


def _records(run_dir: Path, kind: str = "train") -> list[dict]:
    return [r for r in read_records(run_dir / "metrics.jsonl") if r["kind"] == kind]


def _latest(tmp: Path) -> Path:
    latest = ckpt.latest_complete_checkpoint(tmp / "ckpts" / "tiny")
    assert latest is not None
    return latest


def _ids(vocab: int = 512) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(0))


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("lora")
    _, run_dir = train_in_process(tmp, *LORA, "checkpoint.merge_adapter=true", _cache(tiny_model_dir))
    return {"tmp": tmp, "run": run_dir, "ckpt": _latest(tmp)}


# ------------------------------------------------------------------------------------------ training


def test_lora_learns_and_its_checkpoint_is_the_adapter_in_peft_format(lora_run, tiny_model_dir):
    train = _records(lora_run["run"])
    summary = _records(lora_run["run"], "summary")[-1]
    # A random tiny model with frozen random embeddings learns slowly through rank-16 updates: 6.23 -> 6.16 here
    # (bitwise reproducible on one process); a run that did not train would stay at ~ln(512) = 6.24.
    assert train[-1]["loss"] < train[0]["loss"] - 0.05, (train[0]["loss"], train[-1]["loss"])
    assert summary["val_loss_after"] < summary["val_loss_before"] - 0.05

    latest = lora_run["ckpt"]
    files = {p.name for p in latest.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "tokenizer.json",
            "chat_template.jinja", ckpt.COMPLETE_MARKER} <= files
    assert "model.safetensors" not in files and "config.json" not in files
    config = json.loads((latest / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 16 and config["base_model_name_or_path"] == tiny_model_dir
    card = (latest / "README.md").read_text()
    assert f"base_model: {tiny_model_dir}" in card  # the model card pushed with the adapter names the base

    # No copy of the frozen base anywhere in the checkpoint: every tensor of every weights file is the adapter's
    # (the training state holds the same tensors as the adapter file, with peft's adapter-name infix).
    numel = {}
    for weights in (latest / "adapter_model.safetensors", latest / ckpt.TRAINING_STATE_DIR / "model.safetensors"):
        with safe_open(str(weights), framework="pt") as handle:
            assert handle.keys() and all("lora_" in key for key in handle.keys()), weights
            numel[weights.name] = sum(math.prod(handle.get_slice(k).get_shape()) for k in handle.keys())
    assert len(set(numel.values())) == 1
    assert not list(latest.rglob("*model_states.pt")) and not list(latest.rglob("pytorch_model*"))


def test_only_the_adapter_trains_and_the_frozen_base_stays_bitwise(tmp_path, tiny_model_dir):
    from medsft.train.loop import optimizer_step, setup
    from medsft.train.metrics import MetricWindow

    reset_accelerate()
    cfg = compose_cfg(tiny_overrides(tmp_path, *LORA, "peft.use_dora=true", "train.max_steps=3"))
    ctx = setup(cfg, tmp_path)
    try:
        model = ctx.accelerator.unwrap_model(ctx.model)
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        assert trainable and all("lora_" in name for name in trainable)
        assert any("lora_magnitude_vector" in name for name in trainable)  # DoRA's magnitudes
        # AdamW's weight-decay grouping still applies: matrices decay, DoRA's 1-D magnitudes do not.
        decay, no_decay = param_groups(model, 0.1)
        assert decay["params"] and all(p.ndim == 2 for p in decay["params"])
        assert no_decay["params"] and all(p.ndim == 1 for p in no_decay["params"])
        assert len(decay["params"]) + len(no_decay["params"]) == len(trainable)
        groups = ctx.order.step_groups(ctx.plan, 0, 0)
        for group in groups[:3]:
            assert optimizer_step(ctx, group, MetricWindow())
        after = dict(model.named_parameters())
        changed = {name for name in before if not torch.equal(before[name], after[name])}
        assert changed == trainable
        assert all(torch.equal(before[n], after[n]) for n in before if n not in trainable)
    finally:
        ctx.accelerator.end_training()
        reset_accelerate()


@pytest.mark.parametrize("dtype_key,base_dtype", [("auto", torch.bfloat16), ("float32", torch.float32)])
def test_lora_in_bf16_keeps_a_bf16_frozen_base_and_fp32_master_weights(tmp_path, dtype_key, base_dtype):
    """bf16 mixed precision + LoRA, model.dtype=auto: the frozen base is loaded in bf16 (no fp32 copy of weights
    nothing updates), the adapter and modules_to_save stay fp32 for AdamW, the loss falls, the base stays
    bitwise; model.dtype=float32 keeps the fp32 base."""
    from medsft.train.loop import optimizer_step, setup
    from medsft.train.metrics import MetricWindow

    reset_accelerate()
    cfg = compose_cfg(tiny_overrides(tmp_path, *LORA, "train.mixed_precision=bf16", "peft.modules_to_save=[lm_head]",
                                     f"model.dtype={dtype_key}", "train.max_steps=4"))
    ctx = setup(cfg, tmp_path)
    try:
        model = ctx.accelerator.unwrap_model(ctx.model)
        frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        assert {p.dtype for p in frozen.values()} == {base_dtype}
        assert {p.dtype for p in trainable.values()} == {torch.float32}
        assert any("modules_to_save" in n for n in trainable) and any("lora_" in n for n in trainable)
        stepped = [p for group in ctx.optimizer.param_groups for p in group["params"]]
        assert stepped and all(p.dtype == torch.float32 for p in stepped)
        before = {n: p.detach().clone() for n, p in frozen.items()}
        losses = []
        for group in ctx.order.step_groups(ctx.plan, 0, 0)[:4]:
            window = MetricWindow()
            assert optimizer_step(ctx, group, window)
            losses.append(window.sums["loss_sum"] / window.sums["loss_tokens"])
        assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
        assert all(torch.equal(before[n], p) for n, p in frozen.items())
    finally:
        ctx.accelerator.end_training()
        reset_accelerate()


def test_training_dtype_gives_bf16_only_to_a_frozen_unsharded_base_in_bf16():
    from medsft.models import training_dtype

    lora, qlora, none = (compose_cfg([f"peft={name}"]).peft for name in ("lora", "qlora", "none"))
    assert training_dtype("auto", lora, "bf16") == torch.bfloat16
    assert training_dtype("auto", lora, "no") == torch.float32  # fp32 training: everything fp32
    assert training_dtype("auto", lora, "bf16", sharded=True) == torch.float32  # DeepSpeed / FSDP2 keep one dtype
    assert training_dtype("auto", none, "bf16") == torch.float32  # full fine-tuning: fp32 master weights
    assert training_dtype("auto", qlora, "bf16") == torch.float32  # 4-bit base: bitsandbytes decides
    assert training_dtype("float16", none, "no") == torch.float16  # an explicit dtype is obeyed


def test_gradient_checkpointing_with_lora_gives_the_adapter_gradients(tmp_path, tiny_model_cfg):
    peft_cfg = compose_cfg(["peft=lora"]).peft
    model = load_model(tiny_model_cfg)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model = apply_peft(model, peft_cfg, gradient_checkpointing=True)
    model.train()
    ids = _ids()
    seen = {}
    handle = model.get_input_embeddings().register_forward_hook(lambda m, a, out: seen.update(grad=out.requires_grad))
    loss = model(input_ids=ids, labels=ids).loss
    handle.remove()
    loss.backward()
    assert seen["grad"]  # the frozen embedding's output requires grad: checkpointed segments keep their graph
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    # B starts at zero, so at the first step the gradient reaches B (A's is B^T-weighted: zero)
    assert all(float(g.abs().sum()) > 0 for n, g in grads.items() if "lora_B" in n)


def test_packing_and_chunked_loss_train_with_lora(tmp_path):
    _, dense = train_in_process(tmp_path / "dense", *LORA, "train.max_steps=2", "checkpoint.save_final=false")
    _, chunked = train_in_process(tmp_path / "chunked", *LORA, "train.max_steps=2", "model.chunked_loss=true",
                                  "checkpoint.save_final=false")
    d, c = _records(dense), _records(chunked)
    assert c[0]["loss"] == pytest.approx(d[0]["loss"], rel=1e-5)
    assert c[1]["loss"] == pytest.approx(d[1]["loss"], rel=1e-4)
    _, packed = train_in_process(tmp_path / "packed", *LORA, "train.max_steps=3", "data.packing=true",
                                 "model.chunked_loss=true", "checkpoint.save_final=false")
    p = _records(packed)
    assert len(p) == 3 and all(math.isfinite(r["loss"]) for r in p) and p[-1]["loss"] < p[0]["loss"]


def test_the_chunked_loss_reads_the_trained_lm_head_copy_and_skips_an_adapted_head(tiny_model_cfg):
    ids = _ids()
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    saved = compose_cfg(["peft=lora", "peft.modules_to_save=[lm_head]"]).peft
    model = apply_peft(load_model(tiny_model_cfg), saved, gradient_checkpointing=False)
    with torch.no_grad():  # make the trained copy differ from the frozen head
        model.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    kernels = setup_kernels(model, tiny_model_cfg.copy(), torch.device("cpu"))
    assert not kernels.chunked_loss
    chunked = Kernels(implementation=kernels.implementation, chunked_loss=True, chunk_tokens=5)
    dense_sum, _, _ = forward_loss_sums(model, batch, Kernels(implementation=kernels.implementation))
    chunked_sum, _, _ = forward_loss_sums(model, batch, chunked)
    assert float(chunked_sum) == pytest.approx(float(dense_sum), rel=1e-5)

    adapted = compose_cfg(["peft=lora", "peft.target_modules=[q_proj,lm_head]"]).peft
    head_model = apply_peft(load_model(tiny_model_cfg), adapted, gradient_checkpointing=False)
    node = tiny_model_cfg.copy()
    node.chunked_loss = True
    assert not setup_kernels(head_model, node, torch.device("cpu")).chunked_loss  # dense: the head's LoRA counts


# ------------------------------------------------------------------------------------------ loading, merging


def test_the_adapter_checkpoint_loads_everywhere_model_path_is_read(lora_run, tiny_model_dir, tiny_model_cfg):
    latest = lora_run["ckpt"]
    ids = _ids()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    reference = _logits(PeftModel.from_pretrained(base, str(latest)), ids)
    # transformers loads an adapter folder itself when peft is installed
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(latest), ids), reference)
    # medsft's model.path (eval, generation check, RL): base + adapter, merged
    node = tiny_model_cfg.copy()
    node.path = str(latest)
    merged = load_model(node)
    assert not isinstance(merged, PeftModel) and all(p.requires_grad for p in merged.parameters())  # trainable
    torch.testing.assert_close(_logits(merged, ids), reference, rtol=0, atol=MERGE_TOLERANCE)


def test_medsft_eval_and_the_vllm_refusal_on_an_adapter_checkpoint(lora_run, tmp_path, tiny_model_dir):
    from medsft.eval.config import compose_eval_config
    from medsft.eval.runner import run_evaluation

    questions = ROOT / "tests" / "fixtures" / "eval" / "mini_mcq.json"
    common = ["model=tiny_random", f"model.path={lora_run['ckpt']}", _cache(tiny_model_dir), "eval=custom",
              f"eval.path={questions}", "eval.limit=3", "eval.max_new_tokens=4", "eval.progress=false"]
    out = run_evaluation(compose_eval_config(common), tmp_path / "out")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["overall"]["n"] == 3 and summary["model"]["path"] == str(lora_run["ckpt"])
    with pytest.raises(ConfigError) as err:
        run_evaluation(compose_eval_config([*common, "eval.backend=vllm"]), tmp_path / "vllm")
    assert "is an adapter checkpoint; merge it first" in str(err.value)


def test_medsft_merge_writes_a_plain_model_equal_to_base_plus_adapter(lora_run, tiny_model_dir, tmp_path, capsys):
    latest = lora_run["ckpt"]
    out = tmp_path / "merged"
    done = subprocess.run([sys.executable, "-m", "medsft.cli", "merge", str(latest), "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= {p.name for p in out.iterdir()}
    assert not (out / "adapter_config.json").exists()
    assert f"base_model: {tiny_model_dir}" in (out / "README.md").read_text()
    ids = _ids()
    reference = _logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                                  str(latest)), ids)
    merged = _logits(AutoModelForCausalLM.from_pretrained(out), ids)
    assert float((merged - reference).abs().max()) <= MERGE_TOLERANCE
    assert not torch.equal(reference, _logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir), ids))

    from medsft.cli import main as medsft_main  # the same entry point, in process: the errors and exit codes

    assert medsft_main(["merge", str(latest), "--out", str(out)]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err
    assert medsft_main(["merge", str(out), "--out", str(tmp_path / "x")]) == 4
    assert "not an adapter checkpoint" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_merge_adapter_writes_the_final_merged_model(lora_run):
    merged_dir = lora_run["ckpt"] / "merged"
    assert (merged_dir / "config.json").is_file() and not (merged_dir / "adapter_config.json").exists()
    ids = _ids()
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(merged_dir), ids),
                               _logits(AutoModelForCausalLM.from_pretrained(lora_run["ckpt"]), ids),
                               rtol=0, atol=MERGE_TOLERANCE)


def test_the_pushed_adapter_folder_carries_the_model_card(lora_run):
    from medsft.tracking import HubPusher

    api = RecordingHub()
    api.release.set()
    pusher = HubPusher("me/lora", api=api)
    pusher.submit(lora_run["ckpt"], "step")
    pusher.close(timeout_s=30)
    assert not pusher.errors
    _, _, files, card = next(c for c in api.calls if c[0] == "upload_folder")
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors"} <= set(files)
    assert not any(name.startswith("training_state") for name in files)
    assert "library_name: peft" in card


# ------------------------------------------------------------------------------------------ start-up errors


def test_qlora_on_cpu_fails_at_start_up_before_any_model_is_loaded(tmp_path):
    from medsft.run import run

    cache = tmp_path / "models"
    cfg = compose_cfg(tiny_overrides(tmp_path, "peft=qlora", f"model.cache_dir={cache}"))
    with pytest.raises(ConfigError) as err:
        run(cfg, tmp_path / "run")
    message = str(err.value)
    assert "peft=qlora" in message and "CUDA" in message and "peft=lora" in message
    assert not cache.exists()  # the tiny model was never even built, let alone loaded

    result = launch(*tiny_overrides(tmp_path, "peft=qlora", f"model.cache_dir={cache}"),
                    f"hydra.run.dir={tmp_path / 'run2'}")
    assert result.returncode == 2 and "needs a CUDA GPU" in result.stderr and "Traceback" not in result.stderr
    assert not cache.exists() and not (tmp_path / "ckpts").exists()


def test_an_adapter_on_top_of_an_adapter_checkpoint_is_refused(lora_run, tmp_path):
    with pytest.raises(ConfigError) as err:
        train_in_process(tmp_path, "peft=lora", f"model.path={lora_run['ckpt']}")
    assert "is an adapter checkpoint and peft=lora would train another adapter" in str(err.value)
    assert "medsft merge" in str(err.value) and not (tmp_path / "ckpts").exists()


def test_a_bad_target_module_name_fails_naming_it_and_the_linear_layers(tmp_path):
    with pytest.raises(ConfigError) as err:
        train_in_process(tmp_path, "peft=lora", "peft.target_modules=[q_proj,qkv_proj]")
    message = str(err.value)
    assert "peft.target_modules: ['qkv_proj'] not found in LlamaForCausalLM" in message
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head (the LM head)"):
        assert name in message
    with pytest.raises(ConfigError) as err:
        train_in_process(tmp_path, "peft=lora", "peft.target_modules=[mlp]", "peft.modules_to_save=[embed]")
    assert "['mlp (LlamaMLP)'] are not layers LoRA adapts" in str(err.value)
    assert "peft.modules_to_save: ['embed'] not found" in str(err.value) and "embed_tokens" in str(err.value)
    assert not (tmp_path / "ckpts").exists()


def test_peft_keys_are_typed_and_checked(compose_config):
    from medsft.config import unknown_override_keys, validate

    assert "unknown config key 'peft.rank'" in unknown_override_keys(["peft.rank=8"])[0]
    for overrides, expected in [
        (["peft=lora", "peft.r=0"], "peft.r=0 must be >= 1"),
        (["peft=lora", "peft.dropout=1.0"], "peft.dropout=1.0 must be in [0, 1)"),
        (["peft=lora", "peft.bias=some"], "peft.bias='some' is not one of"),
        (["peft=lora", "peft.target_modules=[]"], "peft.target_modules=[] must be all-linear"),
        (["checkpoint.merge_adapter=true"], "checkpoint.merge_adapter=true needs an adapter run"),
        (["peft=qlora", "deepspeed=zero3"], "is not supported"),
        (["peft=lora", "checkpoint.merge_adapter=true", "stage=rl"], "checkpoint.merge_adapter=true is for stage=sft"),
    ]:
        with pytest.raises(ConfigError) as err:
            validate(compose_config(*overrides))
        assert expected in str(err.value), (overrides, str(err.value))
    validate(compose_config("peft=dora", "peft.use_rslora=true", "peft.target_modules=[q_proj,v_proj]"))


# ------------------------------------------------------------------------------------------ exact resume


def _resume_overrides(tmp: Path, *extra: str) -> list[str]:
    return [*tiny_overrides(tmp, *LORA), "logging.plot=false", "data.max_seq_len=256", "data.overlong=truncate",
            "train.gradient_accumulation_steps=2", "train.n_epochs=2", "checkpoint.every_n_steps=2",
            "checkpoint.max_ckpts=1", "peft.dropout=0.1", *extra]


@pytest.mark.slow
def test_sigkill_then_resume_is_bitwise_exact_for_lora(tmp_path):
    from medsft.run import run

    def in_process(tmp: Path, run_name: str):
        reset_accelerate()
        (tmp / run_name).mkdir(parents=True, exist_ok=True)
        try:
            run(compose_cfg(_resume_overrides(tmp)), tmp / run_name)
        finally:
            reset_accelerate()

    ref, tmp = tmp_path / "ref", tmp_path / "killed"
    in_process(ref, "run")
    env = {**os.environ, FAULTS: "kill_mid_step=5", "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, str(ROOT / "launch.py"), *_resume_overrides(tmp),
                             f"hydra.run.dir={tmp / 'a'}"], env=env, cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert [p.name for p in ckpt.list_complete_checkpoints(tmp / "ckpts" / "tiny")] == ["checkpoint-0-4"]
    in_process(tmp, "b")

    expected = {r["step"]: r["loss"] for r in _records(ref / "run")}
    got = {**{r["step"]: r["loss"] for r in _records(tmp / "a")}, **{r["step"]: r["loss"] for r in _records(tmp / "b")}}
    assert min(r["step"] for r in _records(tmp / "b")) == 5
    assert sorted(got) == sorted(expected) == list(range(1, 13)) and got == expected
    ref_w = load_file(_latest(ref) / "adapter_model.safetensors")
    got_w = load_file(_latest(tmp) / "adapter_model.safetensors")
    assert ref_w.keys() == got_w.keys() and all(torch.equal(ref_w[k], got_w[k]) for k in ref_w)


# ------------------------------------------------------------------------------------------ two processes

# No LoRA dropout here: its masks depend on the micro-batch shapes, which differ between 1 and 2 processes.
TWO = ("train.gradient_accumulation_steps=2", "train.n_epochs=1", "checkpoint.save_at_epoch_end=false",
       "peft.modules_to_save=[lm_head]", "peft.dropout=0", "checkpoint.every_n_steps=2", "checkpoint.max_ckpts=1")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("one")
    _, run_dir = train_in_process(tmp, *LORA, *TWO, "train.train_bsz_per_gpu=4", _cache(tiny_model_dir))
    return _records(run_dir)


def _two_processes(tmp: Path, tiny_model_dir: str, *extra: str, run: str = "run", faults: str = "") -> dict:
    env = {**os.environ, "MEDSFT_DEBUG_DUMP": str(tmp / "dump"), **({FAULTS: faults} if faults else {})}
    result = launch(*tiny_overrides(tmp, *LORA, *TWO), "launcher=cpu_2proc", "train.train_bsz_per_gpu=2",
                    _cache(tiny_model_dir), *extra, f"hydra.run.dir={tmp / run}", env=env, timeout=600)
    if faults:
        assert result.returncode != 0
        return {"train": _records(tmp / run)}
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    return {"train": _records(tmp / run), "ckpt": _latest(tmp), "dump": tmp / "dump",
            "out": result.stdout + result.stderr}


def _check_against_one_process(two: dict, one: list[dict], tiny_model_dir: str) -> None:
    assert two["train"][0]["loss"] == pytest.approx(one[0]["loss"], rel=1e-6)
    assert two["train"][0]["grad_norm"] == pytest.approx(one[0]["grad_norm"], rel=1e-5)
    assert two["train"][-1]["loss"] < two["train"][0]["loss"]
    # The adapter file holds real, full tensors (modules_to_save included), not ZeRO-3's empty partitions.
    weights = load_file(two["ckpt"] / "adapter_model.safetensors")
    assert any("lora_A" in k for k in weights) and any("modules_to_save" in k or "lm_head" in k for k in weights)
    assert all(t.numel() > 0 for t in weights.values())
    # A fresh process (this one) reloads it: the job's own logits on rank 0, to float rounding.
    saved = torch.load(two["dump"] / "reference_logits.pt")
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(two["ckpt"]))
    torch.testing.assert_close(_logits(reloaded, saved["input_ids"]), saved["logits"], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.distributed
def test_lora_ddp_two_processes_matches_one_and_reloads(tmp_path, one_process, tiny_model_dir):
    two = _two_processes(tmp_path, tiny_model_dir)
    _check_against_one_process(two, one_process, tiny_model_dir)


@pytest.mark.slow
@pytest.mark.distributed
def test_lora_zero3_two_processes_saves_the_gathered_adapter_that_reloads(tmp_path, one_process, tiny_model_dir):
    pytest.importorskip("deepspeed")
    two = _two_processes(tmp_path, tiny_model_dir, "deepspeed=zero3")
    _check_against_one_process(two, one_process, tiny_model_dir)
    shards = list((two["ckpt"] / ckpt.TRAINING_STATE_DIR).rglob("*model_states.pt"))
    assert shards  # DeepSpeed's own shards, the frozen base left out
    assert sum(p.stat().st_size for p in shards) < (Path(tiny_model_dir) / "model.safetensors").stat().st_size

    # SIGKILL inside step 5, resume from checkpoint 4 (DeepSpeed state without the frozen base): same losses.
    tmp = tmp_path / "killed"
    killed = _two_processes(tmp, tiny_model_dir, "deepspeed=zero3", run="a", faults="kill_mid_step=5")
    assert [p.name for p in ckpt.list_complete_checkpoints(tmp / "ckpts" / "tiny")] == ["checkpoint-0-4"]
    resumed = _two_processes(tmp, tiny_model_dir, "deepspeed=zero3", run="b")
    expected = {r["step"]: r["loss"] for r in two["train"]}
    got = {r["step"]: r["loss"] for r in killed["train"] + resumed["train"]}
    assert min(r["step"] for r in resumed["train"]) == 5 and sorted(got) == sorted(expected)
    for step, loss in got.items():
        assert loss == pytest.approx(expected[step], rel=1e-6), step


@pytest.mark.slow
def test_the_peft_benchmark_smoke_run(tmp_path):
    out = tmp_path / "rows.jsonl"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "peft_bench.py"), "--smoke", "--configs",
                           "full,lora_r16", "--work-dir", str(tmp_path / "work"), "--json-out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {r["config"]: r for r in map(json.loads, out.read_text().splitlines())}
    full, lora = rows["full"], rows["lora_r16"]
    assert full["trainable_params"] == full["total_params"] and 0 < lora["trainable_params"] < lora["total_params"]
    assert lora["total_params"] == full["total_params"] + lora["trainable_params"]  # the adapter is added
    assert full["steps"] == lora["steps"] == 2 and lora["loss_first"] == pytest.approx(full["loss_first"])
    assert 0 < lora["checkpoint_mb"] < full["checkpoint_mb"] and lora["peak_rss_mb"] > 0
    assert "| lora_r16 |" in done.stdout and "checkpoint_mb / full =" in done.stdout


# ------------------------------------------------------------------------------------------ RL


@pytest.mark.slow
def test_rl_starts_from_an_adapter_checkpoint_and_trains_a_policy_adapter(lora_run, tmp_path, tiny_model_dir):
    pytest.importorskip("trl")
    from medsft.run import run

    def rl(name: str, *extra: str):
        reset_accelerate()
        cfg = compose_cfg(["stage=rl", "rl=grpo", "model=tiny_random", _cache(tiny_model_dir),
                           f"output_dir={tmp_path / 'ckpts'}", f"log_dir={tmp_path / 'logs'}", "logging=none",
                           f"experiment_name={name}", "logging.progress_bar=false", "rl.max_completion_length=8",
                           "rl.max_steps=1", "rl.num_generations=2", "rl.per_device_batch_size=2",
                           "rl.gradient_accumulation_steps=1", "rl.data.eval_ratio=0", *extra])
        try:
            run(cfg, tmp_path / name)
        finally:
            reset_accelerate()
        return tmp_path / "ckpts" / name / "rl_grpo" / "final"

    # stage 2 from the SFT adapter checkpoint: base + adapter merged, the whole policy trains
    final = rl("from_adapter", f"model.path={lora_run['ckpt']}")
    assert (final / "model.safetensors").is_file() and not (final / "adapter_config.json").exists()
    # LoRA on the policy: TRL saves the policy's adapter, on the base it was trained on
    final = rl("policy_lora", "peft=lora")
    config = json.loads((final / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == tiny_model_dir and (final / "adapter_model.safetensors").is_file()
    with pytest.raises(ConfigError) as err:
        rl("both", f"model.path={lora_run['ckpt']}", "peft=lora")
    assert "merge it first" in str(err.value)
