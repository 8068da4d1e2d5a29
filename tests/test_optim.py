"""Weight-decay groups, the step plan and the warmup + cosine schedule."""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from medsft.data.order import optimizer_step_groups, rank_micro_batches
from medsft.data.order import StepPlan
from medsft.train.optim import build_optimizer, build_scheduler, lr_multiplier, param_groups


def _tiny(arch):
    common = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**common))
    return Qwen2ForCausalLM(Qwen2Config(**common))  # Qwen2 has q/k/v biases


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_no_decay_on_norms_and_biases(arch):
    model = _tiny(arch)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decay_names = [names[id(p)] for p in decay["params"]]
    no_decay_names = [names[id(p)] for p in no_decay["params"]]
    assert not [n for n in decay_names if "norm" in n or n.endswith(".bias")]
    assert any("input_layernorm" in n for n in no_decay_names)
    assert any("post_attention_layernorm" in n for n in no_decay_names)
    assert "model.norm.weight" in no_decay_names
    if arch == "qwen2":
        assert any(n.endswith("q_proj.bias") for n in no_decay_names)
    assert any(n.endswith("q_proj.weight") for n in decay_names)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert len(decay_names) + len(no_decay_names) == len(list(model.parameters()))


def test_step_plan_counts():
    plan = StepPlan(num_examples=42, bsz=4, accum=3, world=2, epochs=3)
    assert plan.padded_examples == 42
    assert plan.micro_batches_per_epoch == 6  # ceil(42 / 8)
    assert plan.steps_per_epoch == 2 and plan.total_steps == 6
    assert plan.global_batch == 24
    assert StepPlan(42, 4, 3, 2, 3, max_steps=4).total_steps == 4
    assert StepPlan(5, 2, 1, 2, 1).padded_examples == 6


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_example_seen_once_per_epoch_and_ranks_agree(world):
    plan = StepPlan(num_examples=23, bsz=2, accum=2, world=world, epochs=1)
    per_rank = [rank_micro_batches(plan, seed=7, epoch=0, rank=r) for r in range(world)]
    assert len({len(b) for b in per_rank}) == 1  # same number of micro-batches everywhere
    seen = [i for batches in per_rank for batch in batches for i in batch]
    assert set(seen) == set(range(23))
    assert len(seen) == plan.padded_examples
    assert len(optimizer_step_groups(per_rank[0], plan.accum)) == plan.steps_per_epoch
    other_epoch = rank_micro_batches(plan, seed=7, epoch=1, rank=0)
    assert other_epoch != per_rank[0]


def test_lr_follows_warmup_then_cosine_exactly():
    model = torch.nn.Linear(4, 4)
    opt_cfg = type("O", (), dict(learning_rate=1e-3, weight_decay=0.0, betas=[0.9, 0.95], eps=1e-8,
                                 warmup_rates=0.1, scheduler="cosine", min_lr_ratio=0.0))()
    plan = StepPlan(num_examples=100, bsz=1, accum=1, world=1, epochs=1)
    optimizer = build_optimizer(model, opt_cfg)
    scheduler = build_scheduler(optimizer, opt_cfg, plan)
    seen = []
    for _ in range(plan.total_steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    warmup = 10
    expected = [1e-3 * (s + 1) / warmup if s < warmup else
                1e-3 * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (100 - warmup))) for s in range(100)]
    assert seen == pytest.approx(expected, rel=1e-12)
    assert lr_multiplier(0, 100, 0, "constant") == 1.0
