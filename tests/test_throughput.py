"""Throughput kernels and metrics: chunked cross-entropy, kernel selection with clear skips, FLOPs/MFU,
padding efficiency in the loop, and a smoke run of benchmarks/throughput.py."""

from __future__ import annotations

import json
import logging
import sys

import pytest
import torch

from medsft.data.collate import SFTCollator
from medsft.data.packing import PackedCollator
from medsft.compute import attention
from medsft.compute.flops import ModelFlops, device_peak_flops, mfu, peak_flops
from medsft.compute.kernels import Kernels, chunked_token_loss_sums, forward_loss_sums, setup_kernels
from medsft.compute.kernels import token_loss_sums
from medsft.train.metrics import MetricWindow

# ------------------------------------------------------------------------------------ chunked cross-entropy


@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_cross_entropy_equals_dense(with_bias):
    torch.manual_seed(0)
    hidden = torch.randn(3, 29, 16, requires_grad=True)
    weight = torch.randn(97, 16, requires_grad=True)
    bias = torch.randn(97, requires_grad=True) if with_bias else None
    labels = torch.randint(0, 97, (3, 29))
    labels[0, :7] = -100
    labels[2, 20:] = -100
    logits = hidden @ weight.t() + (bias if with_bias else 0)
    ref_loss, ref_n, ref_correct = token_loss_sums(logits, labels)
    (ref_loss * 0.5).backward()
    ref = [t.grad.clone() for t in (hidden, weight, bias) if t is not None]
    for t in (hidden, weight, bias):
        if t is not None:
            t.grad = None
    loss, n, correct = chunked_token_loss_sums(hidden, weight, labels, bias, chunk_tokens=10)
    (loss * 0.5).backward()
    assert int(n) == int(ref_n) and int(correct) == int(ref_correct)
    assert float(loss.detach()) == pytest.approx(float(ref_loss.detach()), rel=1e-6)
    for got, want in zip([t.grad for t in (hidden, weight, bias) if t is not None], ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_chunked_cross_entropy_without_targets_or_grad():
    hidden = torch.randn(1, 5, 4, requires_grad=True)
    weight = torch.randn(11, 4, requires_grad=True)
    loss, n, _ = chunked_token_loss_sums(hidden, weight, torch.full((1, 5), -100), chunk_tokens=4)
    assert float(loss) == 0.0 and int(n) == 0
    loss.backward()  # connected, zero gradients (every DDP parameter still gets one)
    assert hidden.grad.abs().sum() == 0 and weight.grad.abs().sum() == 0
    with torch.no_grad():
        value, _, _ = chunked_token_loss_sums(hidden, weight, torch.randint(0, 11, (1, 5)), chunk_tokens=4)
    assert value.requires_grad is False and torch.isfinite(value)


@pytest.mark.parametrize("trainable_head", [True, False])
def test_chunked_cross_entropy_casts_the_head_once_under_autocast(trainable_head):
    """Under bf16 autocast an fp32 head is cast to bf16 once for all chunks (autocast alone casts it at each of
    the two products of every chunk, and a frozen head's cast is not even cached); the sums and gradients equal
    autocast's own per-chunk products, the head's gradient stays fp32."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class HeadCasts(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            if func is torch.ops.aten._to_copy.default and tuple(args[0].shape) == (97, 16) \
                    and out.dtype == torch.bfloat16:
                self.count += 1
            return out

    torch.manual_seed(0)
    hidden = torch.randn(2, 40, 16, requires_grad=True)
    weight = torch.randn(97, 16, requires_grad=trainable_head)
    labels = torch.randint(0, 97, (2, 40))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_loss, _, _ = token_loss_sums(hidden @ weight.t(), labels)  # autocast's bf16 product, loss in fp32
    ref_loss.backward()
    ref = [hidden.grad.clone()] + ([weight.grad.clone()] if trainable_head else [])
    hidden.grad = weight.grad = None
    casts = HeadCasts()
    with casts, torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _, _ = chunked_token_loss_sums(hidden, weight, labels, chunk_tokens=8)  # 10 chunks
    assert casts.count == 1
    loss.backward()
    assert float(loss.detach()) == pytest.approx(float(ref_loss.detach()), rel=2e-3)
    torch.testing.assert_close(hidden.grad, ref[0], rtol=0.05, atol=2e-3)
    if trainable_head:
        assert weight.grad.dtype == torch.float32
        torch.testing.assert_close(weight.grad, ref[1], rtol=0.05, atol=2e-3)


def test_loss_chunk_tokens_comes_from_the_config_and_must_be_positive(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from medsft.config import compose
    from medsft.config.ranges import range_problems

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    kernels = setup_kernels(model, _model_cfg(chunked_loss=True, loss_chunk_tokens=7), torch.device("cpu"))
    assert kernels.chunked_loss and kernels.chunk_tokens == 7
    assert compose(["~experiment"]).model.loss_chunk_tokens == 1024  # conf/model/base.yaml
    errors = range_problems(compose(["~experiment", "model.loss_chunk_tokens=0"]))
    assert any("model.loss_chunk_tokens" in e for e in errors)
    with pytest.raises(ValueError, match="loss_chunk_tokens"):
        chunked_token_loss_sums(torch.randn(1, 3, 4), torch.randn(5, 4), torch.ones(1, 3, dtype=torch.long),
                                chunk_tokens=0)


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.eval()
    return model


def _batch_examples():
    g = torch.Generator().manual_seed(1)
    out = []
    for length in (9, 17, 5):
        ids = torch.randint(5, 500, (length,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * 2 + ids[2:]})
    return out


@pytest.mark.parametrize("packed", [False, True])
def test_forward_loss_sums_chunked_equals_dense_on_the_model(tiny_model, packed):
    attention.register()
    examples = _batch_examples()
    batch = PackedCollator(0)(examples) if packed else SFTCollator(0)(examples)
    impl = attention.VARLEN if packed else "sdpa"
    tiny_model.set_attn_implementation(impl)
    try:
        results = []
        for chunked in (False, True):
            tiny_model.zero_grad(set_to_none=True)
            loss, n, correct = forward_loss_sums(tiny_model, batch, Kernels(impl, chunked_loss=chunked, chunk_tokens=7))
            loss.backward()
            grads = torch.cat([p.grad.reshape(-1) for p in tiny_model.parameters() if p.grad is not None])
            results.append((float(loss.detach()), int(n), int(correct), grads))
    finally:
        tiny_model.set_attn_implementation("sdpa")
    (dense_loss, dense_n, dense_c, dense_g), (loss, n, c, g) = results
    assert (n, c) == (dense_n, dense_c)
    assert loss == pytest.approx(dense_loss, rel=1e-5)
    torch.testing.assert_close(g, dense_g, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------- kernel choice


def _model_cfg(**values):
    from medsft.config import compose

    cfg = compose(["~experiment", "model=tiny_random"]).model  # conf/'s model defaults (what the `compose_config` fixture gives)
    for key, value in values.items():
        cfg[key] = value
    return cfg


def test_kernels_are_skipped_with_a_clear_message_on_cpu(tiny_model_dir, caplog):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with caplog.at_level(logging.INFO):
        kernels = setup_kernels(model, _model_cfg(use_liger_kernel=True, compile=True), torch.device("cpu"),
                                packing=True)
    assert "Liger kernels need CUDA" in caplog.text
    assert kernels.chunked_loss and not kernels.liger  # the chunked cross-entropy still replaces full logits
    assert kernels.implementation == attention.VARLEN
    assert kernels.compiled and all(layer._compiled_call_impl is not None for layer in model.model.layers)
    assert set(model.state_dict()) == set(AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict())

    flex = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32,
                                                attn_implementation="flex_attention")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        chosen = setup_kernels(flex, _model_cfg(attn_implementation="flex_attention"), torch.device("cpu"),
                               packing=True)
    assert chosen.implementation == attention.VARLEN
    assert "no backward there" in caplog.text
    assert setup_kernels(model, _model_cfg(), torch.device("cpu"), zero3=True).chunked_loss is False


def test_chunked_loss_alone_needs_no_liger(tiny_model_dir, caplog):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert setup_kernels(model, _model_cfg(), torch.device("cpu")).chunked_loss is False
    with caplog.at_level(logging.INFO):
        kernels = setup_kernels(model, _model_cfg(chunked_loss=True), torch.device("cpu"))
    assert kernels.chunked_loss and not kernels.liger and not kernels.compiled
    assert "Liger" not in caplog.text and "chunked linear cross-entropy" in caplog.text


# ------------------------------------------------------------------------------------------- FLOPs and MFU


def test_flops_count_and_peak_table(tiny_model):
    counted = ModelFlops.of(tiny_model)
    cfg = tiny_model.config
    total = sum(p.numel() for p in tiny_model.parameters())
    embed = tiny_model.get_input_embeddings().weight.numel()
    assert cfg.tie_word_embeddings and counted.matmul_params == total  # tied head: counted once, as a matmul
    assert counted.n_layers == cfg.num_hidden_layers and counted.d_attn == cfg.hidden_size
    assert counted.training_flops(10, [4, 6]) == 6 * total * 10 + 12 * cfg.num_hidden_layers * cfg.hidden_size * 52
    assert total - embed < counted.matmul_params
    assert peak_flops("NVIDIA H200") == 989e12 and peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12 and peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", "tf32") == 156e12 and peak_flops("Tesla T4") is None
    assert device_peak_flops(torch.device("cpu")) is None
    assert mfu(989e12 * 0.5 * 2, 1.0, 2, 989e12) == pytest.approx(0.5) and mfu(1.0, 1.0, 1, None) is None


def test_metric_window_reports_padding_efficiency_and_mfu():
    class Acc:
        device = torch.device("cpu")
        num_processes = 1

    window = MetricWindow()
    window.add_micro_batch(loss_sum=2.0, loss_tokens=4, correct=1, tokens=30, samples=2, padded_tokens=40, flops=8e9)
    window.add_micro_batch(loss_sum=1.0, loss_tokens=2, correct=1, tokens=10, samples=1)  # no padding given
    figures = window.reduce(Acc(), peak_flops=1e12)
    assert figures["padding_efficiency"] == pytest.approx(40 / 50)
    assert figures["mfu"] is not None and 0 < figures["mfu"]
    assert MetricWindow().reduce(Acc())["mfu"] is None


# ---------------------------------------------------------------------------------------------- the loop


def test_packed_run_with_chunked_loss_and_validation(tmp_path):
    from train_utils import train_in_process

    from medsft.outputs import read_records as read_metrics

    objective, run_dir = train_in_process(tmp_path, "data.packing=true", "model.use_liger_kernel=true",
                                          "train.max_steps=2", "train.train_bsz_per_gpu=1",
                                          "checkpoint.save_at_epoch_end=false")
    records = read_metrics(run_dir / "metrics.jsonl")
    train = [r for r in records if r["kind"] == "train"]
    assert len(train) == 2 and all(r["padding_efficiency"] == 1.0 and r["mfu"] is None for r in train)
    assert all(r["samples"] >= 1 and r["tokens_per_s_per_device"] > 0 for r in train)
    summary = [r for r in records if r["kind"] == "summary"][-1]
    assert summary["val_loss_after"] is not None and objective == pytest.approx(summary["val_loss_after"])


# ------------------------------------------------------------------------------------------ benchmark


def test_benchmark_smoke(tmp_path, capsys):
    """benchmarks/throughput.py end to end on the tiny shape: every JSON line parses, ratios are reported."""
    pytest.importorskip("trl")
    import importlib.util

    from train_utils import ROOT

    spec = importlib.util.spec_from_file_location("bench_throughput", ROOT / "benchmarks" / "throughput.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # its dataclasses resolve their module through sys.modules
    spec.loader.exec_module(bench)
    out_file = tmp_path / "bench.jsonl"
    assert bench.main(["--smoke", "--modes", "medsft_packed,trl_padding_free", "--examples", "3",
                       "--prep-records", "12", "--prep-rounds", "1", "--work-dir", str(tmp_path),
                       "--json-out", str(out_file)]) == 0
    lines = [json.loads(line) for line in out_file.read_text().splitlines()]
    by = {(x["bench"], x.get("config")): x for x in lines}
    assert by[("throughput", "medsft_packed")]["padding_efficiency"] == 1.0
    assert by[("throughput", "medsft_packed")]["real_tokens"] == by[("throughput", "trl_padding_free")]["real_tokens"]
    assert by[("throughput", "best_vs_best")]["ratio_best_of_rounds"] > 0
    assert by[("data_prep", "ratio")]["trl_over_medsft"] > 0
    assert "tok/s best" in capsys.readouterr().out
