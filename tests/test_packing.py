"""Packing and length grouping: the packer, the packed collator, attention that cannot cross examples, the
per-example equivalence of packed and unpacked losses/gradients, and the deterministic data order."""

from __future__ import annotations

import json
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from medsft.data.collate import SFTCollator
from medsft.data.packing import PackedCollator, best_fit_decreasing, packing_stats
from medsft.compute import attention
from medsft.data.order import (
    DataOrder,
    length_grouped_micro_batches,
    packed_micro_batches,
    rank_micro_batches,
)
from medsft.compute.kernels import Kernels, forward_loss_sums
from medsft.compute.kernels import token_loss_sums
from medsft.data.order import StepPlan

# ----------------------------------------------------------------------------------------------- packer


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 64), min_size=1, max_size=80), st.integers(64, 100), st.integers(0, 3))
def test_best_fit_decreasing_packs_every_example_once_within_capacity(lengths, capacity, seed):
    rows = best_fit_decreasing(lengths, capacity, seed)
    flat = [i for row in rows for i in row]
    assert sorted(flat) == list(range(len(lengths)))
    loads = [sum(lengths[i] for i in row) for row in rows]
    assert all(0 < load <= capacity for load in loads)
    # Any-fit property: a new row is opened only when nothing fits, so at most one row is half empty or worse.
    assert sum(load <= capacity / 2 for load in loads) <= 1
    assert len(rows) >= -(-sum(lengths) // capacity)
    assert rows == best_fit_decreasing(lengths, capacity, seed)  # deterministic given the seed


def test_best_fit_is_best_fit_and_rejects_what_cannot_fit():
    # 6 goes first into a new row (room 4); 5 opens a second (room 5); 4 fits both and takes the fuller (room 4).
    assert best_fit_decreasing([5, 6, 4], 10) == [[1, 2], [0]]
    with pytest.raises(ValueError, match="more than the row capacity"):
        best_fit_decreasing([3, 11], 10)
    rng = random.Random(1)
    lengths = [rng.randint(280, 1150) for _ in range(300)]
    stats = packing_stats(lengths, best_fit_decreasing(lengths, 2048, 0), 2048)
    assert stats["fill"] > 0.95 and stats["examples"] == 300


def test_seed_only_reorders_ties():
    lengths = [5] * 6 + [3] * 4
    a, b = best_fit_decreasing(lengths, 10, seed=0), best_fit_decreasing(lengths, 10, seed=1)
    assert a != b  # the seed picks which equal-length examples go together
    assert sorted(sorted(lengths[i] for i in row) for row in a) == sorted(sorted(lengths[i] for i in row) for row in b)


# --------------------------------------------------------------------------------------------- collator


def _example(ids, labels=None):
    return {"input_ids": list(ids), "labels": list(ids if labels is None else labels)}


def test_packed_collator_boundaries_positions_and_labels():
    examples = [_example([11, 12, 13]), _example([21, 22], [-100, 22]), _example([31, 32, 33, 34])]
    b = PackedCollator(pad_token_id=0)(examples)
    assert b["input_ids"].tolist() == [[11, 12, 13, 21, 22, 31, 32, 33, 34]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    assert b["seq_idx"].tolist() == [[0, 0, 0, 1, 1, 2, 2, 2, 2]]
    assert b["cu_seq_lens"].tolist() == [0, 3, 5, 9] and b["cu_seq_lens"].dtype == torch.int32
    assert b["max_length"] == 4 and b["num_examples"] == 3 and b["real_tokens"] == 9
    # The first token of every example is never a target: token_loss_sums reads labels[:, 1:], so the last
    # token of one example can never be trained to predict the next example's first token.
    assert b["labels"].tolist() == [[-100, 12, 13, -100, 22, -100, 32, 33, 34]]
    assert "attention_mask" not in b  # an all-ones mask would merge the examples
    padded = PackedCollator(pad_token_id=0, pad_to_multiple_of=8)(examples)
    assert padded["input_ids"].shape[1] == 16 and padded["real_tokens"] == 9 and padded["num_examples"] == 3
    assert padded["labels"][0, 9:].eq(-100).all() and padded["position_ids"][0, 9:].tolist() == list(range(7))


# --------------------------------------------------------------------------- equivalence and contamination


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():  # away from the init, so examples differ in loss and gradient
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.eval()  # no dropout; gradients still flow
    return model


def _examples(n=4, seed=0, vocab=500):
    g = torch.Generator().manual_seed(seed)
    lengths = [7, 19, 3, 12, 25, 9][:n]
    out = []
    for k, length in enumerate(lengths):
        ids = torch.randint(5, vocab, (length,), generator=g).tolist()
        labels = list(ids)  # whole-sequence loss: a label on the FIRST token too, which packing must drop
        if k % 2:
            labels[: length // 3] = [-100] * (length // 3)  # a prompt without loss
        out.append(_example(ids, labels))
    return out


def _grads(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


def _alone(model, ex):
    model.zero_grad(set_to_none=True)
    b = SFTCollator(pad_token_id=0)([ex])
    loss, n, _ = token_loss_sums(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                                 b["labels"])
    loss.backward()
    return float(loss.detach()), int(n), _grads(model)


def _packed_per_example(model, batch, implementation, k):
    """Loss of example k inside the packed row (its own positions only) and its gradient."""
    model.zero_grad(set_to_none=True)
    logits = model(**attention.model_inputs(batch, implementation)).logits
    s, e = batch["cu_seq_lens"][k].item(), batch["cu_seq_lens"][k + 1].item()
    labels = torch.full_like(batch["labels"], -100)
    labels[:, s:e] = batch["labels"][:, s:e]
    loss, n, _ = token_loss_sums(logits, labels)
    loss.backward()
    return float(loss.detach()), int(n), _grads(model)


@pytest.mark.parametrize("implementation", [attention.VARLEN, "eager", "sdpa"])
def test_packed_loss_and_gradients_equal_unpacked_per_example(tiny_model, implementation):
    """The core guarantee: packing changes nothing an example computes (fp32, tolerance 1e-5)."""
    attention.register()
    model = tiny_model
    model.set_attn_implementation(implementation)
    try:
        examples = _examples()
        batch = PackedCollator(pad_token_id=0)(examples)
        total_alone = 0.0
        for k, ex in enumerate(examples):
            loss_a, n_a, grad_a = _alone(model, ex)
            loss_p, n_p, grad_p = _packed_per_example(model, batch, implementation, k)
            total_alone += loss_a
            assert n_p == n_a
            assert loss_p == pytest.approx(loss_a, rel=1e-5, abs=1e-5)
            torch.testing.assert_close(grad_p, grad_a, rtol=1e-5, atol=1e-5)
        # The whole packed batch through the training forward: the sum of the alone losses, and no extra targets
        # at the boundaries (each example's first token carries a label that a naive concatenation would train).
        with torch.no_grad():
            loss, n, _ = forward_loss_sums(model, batch, Kernels(implementation=implementation))
        assert int(n) == sum(_alone_count(ex) for ex in examples)
        assert float(loss) == pytest.approx(total_alone, rel=1e-5)
    finally:
        model.set_attn_implementation("sdpa")


def _alone_count(ex):
    return sum(1 for x in ex["labels"][1:] if x != -100)


@pytest.mark.parametrize("implementation", [attention.VARLEN, "eager", "sdpa"])
def test_no_example_sees_another(tiny_model, implementation):
    """Changing one example's tokens changes nothing in the logits of the others, in any position."""
    attention.register()
    tiny_model.set_attn_implementation(implementation)
    try:
        examples = _examples(n=5)
        changed = [dict(ex) for ex in examples]
        changed[1] = _example([7] * len(examples[1]["input_ids"]))
        with torch.no_grad():
            a = tiny_model(**attention.model_inputs(PackedCollator(0)(examples), implementation)).logits
            b = tiny_model(**attention.model_inputs(PackedCollator(0)(changed), implementation)).logits
        cu = PackedCollator(0)(examples)["cu_seq_lens"].tolist()
        for k in (0, 2, 3, 4):
            torch.testing.assert_close(a[:, cu[k] : cu[k + 1]], b[:, cu[k] : cu[k + 1]], rtol=0, atol=1e-6)
        # Control: the same change in a naively concatenated row (no boundaries) leaks into later examples.
        naive = {"input_ids": PackedCollator(0)(examples)["input_ids"]}
        naive_changed = {"input_ids": PackedCollator(0)(changed)["input_ids"]}
        with torch.no_grad():
            na, nb = tiny_model(**naive).logits, tiny_model(**naive_changed).logits
        assert (na[:, cu[2] :] - nb[:, cu[2] :]).abs().max() > 1e-3
    finally:
        tiny_model.set_attn_implementation("sdpa")


def test_varlen_attention_is_sdpa_for_padded_batches_and_rebuilds_boundaries(tiny_model):
    """medsft_varlen on padded batches equals sdpa; without cu_seq_lens it reads boundaries from position_ids,
    even with transformers' default cache on (which makes plain sdpa ignore them)."""
    attention.register()
    examples = _examples()
    padded = SFTCollator(pad_token_id=0)(examples)
    packed = PackedCollator(0)(examples)
    with torch.no_grad():
        tiny_model.set_attn_implementation("sdpa")
        ref_padded = tiny_model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
        ref_packed = tiny_model(**attention.model_inputs(packed, "sdpa")).logits
        tiny_model.set_attn_implementation(attention.VARLEN)
        try:
            got_padded = tiny_model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
            got_packed = tiny_model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits
        finally:
            tiny_model.set_attn_implementation("sdpa")
    mask = padded["attention_mask"].bool()
    torch.testing.assert_close(got_padded[mask], ref_padded[mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_packed, ref_packed, rtol=1e-5, atol=1e-5)


def test_dropping_the_right_padding_mask_keeps_the_loss(tiny_model):
    """Grouped batches drop the padding mask under causal sdpa: same loss, same gradients."""
    batch = SFTCollator(pad_token_id=0)(_examples())
    assert attention.is_right_padded(batch["attention_mask"])
    results = []
    for drop in (False, True):
        tiny_model.zero_grad(set_to_none=True)
        loss, n, correct = forward_loss_sums(tiny_model, batch, Kernels("sdpa", drop_causal_padding_mask=drop))
        loss.backward()
        results.append((float(loss.detach()), int(n), int(correct), _grads(tiny_model)))
    assert results[0][1:3] == results[1][1:3]
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-5)
    torch.testing.assert_close(results[1][3], results[0][3], rtol=1e-5, atol=1e-5)
    left = batch["attention_mask"].flip(-1)
    assert not attention.is_right_padded(left)  # left padding keeps its mask


# ----------------------------------------------------------------------------------------- data order


def _lengths(n, seed=0):
    rng = random.Random(seed)
    return [rng.choice([rng.randint(280, 400), rng.randint(500, 1150)]) for _ in range(n)]


def _padding_efficiency(batches, lengths):
    real = sum(lengths[i] for b in batches for i in b)
    computed = sum(len(b) * max(lengths[i] for i in b) for b in batches if b)
    return real / computed


@pytest.mark.parametrize("world", [1, 2])
def test_length_grouping_is_seeded_complete_and_removes_padding(world):
    lengths = _lengths(203)
    plan = StepPlan(num_examples=203, bsz=4, accum=2, world=world, epochs=2)
    per_rank = [length_grouped_micro_batches(plan, lengths, seed=3, epoch=0, rank=r) for r in range(world)]
    baseline = [rank_micro_batches(plan, seed=3, epoch=0, rank=r) for r in range(world)]
    assert [len(b) for b in per_rank] == [len(b) for b in baseline] == [plan.micro_batches_per_epoch] * world
    assert sorted(len(x) for x in per_rank[0]) == sorted(len(x) for x in baseline[0])
    seen = [i for batches in per_rank for b in batches for i in b]
    assert set(seen) == set(range(203)) and len(seen) == plan.padded_examples
    # pure function of (seed, epoch, world, rank): a resumed run recomputes exactly this order
    assert per_rank[0] == length_grouped_micro_batches(plan, lengths, seed=3, epoch=0, rank=0)
    assert per_rank[0] != length_grouped_micro_batches(plan, lengths, seed=4, epoch=0, rank=0)
    assert per_rank[0] != length_grouped_micro_batches(plan, lengths, seed=3, epoch=1, rank=0)
    grouped = _padding_efficiency([b for r in per_rank for b in r], lengths)
    random_order = _padding_efficiency([b for r in baseline for b in r], lengths)
    assert grouped > 0.95 and grouped > random_order + 0.1, (grouped, random_order)
    # the longest example's micro-batch comes first (an out-of-memory shows at step 1)
    assert max(lengths) in [lengths[i] for r in per_rank for i in r[0]]


def test_packed_order_covers_rows_once_per_epoch_and_is_pure():
    lengths = _lengths(120, seed=1)
    order = DataOrder("packed", lengths, PackedCollator(pad_token_id=0), best_fit_decreasing(lengths, 2048, seed=5),
                      seed=5)
    plan = StepPlan(num_examples=order.units, bsz=2, accum=2, world=2, epochs=2)
    per_rank = [order.micro_batches(plan, 0, r) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == plan.micro_batches_per_epoch
    seen = [i for batches in per_rank for b in batches for i in b]
    assert set(seen) == set(range(120))
    for batches in per_rank:
        for b in batches:
            assert sum(lengths[i] for i in b) <= plan.bsz * 2048  # the micro-batch token budget
    assert per_rank[0] == packed_micro_batches(plan, order.rows, 5, 0, 0)
    assert per_rank[0] != order.micro_batches(plan, 1, 0)


def test_data_order_from_config(data_config):
    """The data hands the loop its order and the collator that goes with it; the loop chooses neither."""
    examples = [{"input_ids": [1] * n} for n in (5, 3, 4, 2)]
    cfg = data_config(packing=True, group_by_length=False, max_seq_len=8)
    packed = DataOrder.from_config(cfg, examples, seed=0, pad_token_id=0)
    assert packed.mode == "packed" and packed.units == 2 and isinstance(packed.collator, PackedCollator)
    cfg.packing, cfg.group_by_length = False, True
    grouped = DataOrder.from_config(cfg, examples, seed=0, pad_token_id=0)
    assert grouped.mode == "grouped" and isinstance(grouped.collator, SFTCollator)
    cfg.group_by_length = False
    assert DataOrder.from_config(cfg, examples, seed=0, pad_token_id=0).units == 4


# ------------------------------------------------------------------------------------------ in the loop


def _first_step(tmp_path, name, data, *extra):
    from train_utils import train_in_process
    from medsft.outputs import read_records as read_metrics

    _, run_dir = train_in_process(tmp_path / name, f"data.path={data}", "train.max_steps=1", "data.val_ratio=0",
                                  "optimizer.max_grad_norm=1e9", "checkpoint.save_final=false",
                                  "checkpoint.save_at_epoch_end=false", "data.shuffle=false", *extra)
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"][0]


def test_loop_first_step_is_identical_packed_grouped_and_padded(tmp_path):
    """Same examples in one optimizer step: loss, token count and gradient norm agree across the three modes."""
    from train_utils import ROOT

    records = json.loads((ROOT / "data" / "demo_data.json").read_text(encoding="utf-8"))[:3]
    for k, record in enumerate(records):  # short, different lengths: they pack into one 1024-token row
        record["Razonamiento_Complejo"] = record["Razonamiento_Complejo"][: 150 + 120 * k]
        record["Respuesta"] = record["Respuesta"][:80]
    data = tmp_path / "three.json"
    data.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    padded = _first_step(tmp_path, "padded", data, "train.train_bsz_per_gpu=3")
    grouped = _first_step(tmp_path, "grouped", data, "train.train_bsz_per_gpu=3", "data.group_by_length=true")
    packed = _first_step(tmp_path, "packed", data, "train.train_bsz_per_gpu=1", "data.packing=true")
    assert packed["samples"] == padded["samples"] == 3
    assert packed["loss_tokens"] == padded["loss_tokens"] == grouped["loss_tokens"]
    for other in (grouped, packed):
        assert other["loss"] == pytest.approx(padded["loss"], rel=1e-5)
        assert other["grad_norm"] == pytest.approx(padded["grad_norm"], rel=1e-4)
    assert packed["padding_efficiency"] == 1.0 and padded["padding_efficiency"] < 1.0
    assert packed["tokens"] == padded["tokens"]


@pytest.mark.parametrize("mode", ["data.packing=true", "data.group_by_length=true"])
def test_preempted_packed_or_grouped_run_resumes_bitwise_exactly(tmp_path, monkeypatch, mode):
    """Interrupted at a step boundary and resumed, a packed (or grouped) run logs the same losses as an
    uninterrupted one: the rows and their order are recomputed from (seed, epoch, world, rank)."""
    from train_utils import train_in_process

    from medsft.testing.faults import ENV
    from medsft.outputs import read_records as read_metrics
    from medsft.train.signals import TrainingPreempted

    common = (mode, "data.max_samples=12", "data.max_seq_len=2048", "data.overlong=truncate", "data.val_ratio=0",
              "train.train_bsz_per_gpu=1", "train.n_epochs=2", "checkpoint.every_n_steps=0",
              "checkpoint.save_final=false", "checkpoint.save_at_epoch_end=false", "logging.plot=false")

    def losses(run_dir):
        return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"}

    _, ref_dir = train_in_process(tmp_path / "ref", *common)
    reference = losses(ref_dir)
    stop = len(reference) // 2 + 1  # mid-run
    monkeypatch.setenv(ENV, f"sigterm_after_step={stop}")
    with pytest.raises(TrainingPreempted):
        train_in_process(tmp_path / "cut", *common, run_dir=tmp_path / "cut" / "first")
    monkeypatch.delenv(ENV)
    train_in_process(tmp_path / "cut", *common, run_dir=tmp_path / "cut" / "second")
    first, second = losses(tmp_path / "cut" / "first"), losses(tmp_path / "cut" / "second")
    assert max(first) == stop and min(second) == stop + 1
    assert {**first, **second} == reference  # bitwise
