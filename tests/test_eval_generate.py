"""Batched generation on CPU with the tiny random model: left padding, order, state restored, wrappers."""

import pytest
import torch

from medsft.eval.benchmarks import load_huatuo_format
from medsft.eval.generate import (
    encode_prompts, generate_batch, generate_responses, stop_token_ids, summarize_generations, unwrap_model,
)
from medsft.eval.runner import evaluate_benchmark
from pathlib import Path

FIX = Path(__file__).parent / "fixtures" / "eval"
QUESTIONS = ["¿Qué vitamina falta en el escorbuto?", "Hola", "Una pregunta bastante más larga que las demás, con detalle."]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    # The tiny model's init emits "\n" forever; perturbed weights give varied tokens, so that comparing
    # batched with one-by-one generation actually tests the left padding.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
    return model, tok


class Wrapper(torch.nn.Module):  # what DDP / accelerate wrappers look like from outside
    def __init__(self, module):
        super().__init__()
        self.module = module


def test_generate_batched_equals_one_by_one_and_restores_state(tiny):
    model, tok = tiny
    tok.padding_side = "right"
    model.train()
    batched = generate_responses(model, tok, QUESTIONS, max_new_tokens=12, batch_size=3, progress=False)
    assert tok.padding_side == "right" and model.training  # restored
    single = generate_responses(model, tok, QUESTIONS, max_new_tokens=12, batch_size=1, progress=False)
    assert len(batched) == 3 and all(isinstance(t, str) for t in batched)
    assert len(set(batched)) == 3  # varied answers (see the fixture)
    assert batched == single  # left padding + attention mask: padding does not change greedy answers
    assert generate_responses(model, tok, QUESTIONS, 12, 2, progress=False) == batched  # deterministic


def test_generate_wrapped_model_and_details(tiny):
    model, tok = tiny
    wrapped = Wrapper(model)
    assert unwrap_model(wrapped) is model
    res = generate_batch(wrapped, tok, QUESTIONS[:2], max_new_tokens=5, batch_size=2, progress=False)
    assert res.texts == generate_responses(model, tok, QUESTIONS[:2], 5, progress=False)
    assert all(0 <= n <= 5 for n in res.new_tokens) and len(res.truncated) == 2
    assert res.prompt_tokens[0] > 5 and res.seconds > 0
    stops = stop_token_ids(tok, model)
    assert tok.eos_token_id in stops
    assert tok.convert_tokens_to_ids("<|eot_id|>") in stops  # the end-of-turn token training teaches
    s = summarize_generations(res.texts, tok)
    assert s["n"] == 2 and s["format_compliance"] == 0.0 and "mean_tokens" in s


def test_repetition_penalty_reaches_generate(tiny):
    from transformers import GenerationConfig

    model, tok = tiny
    plain = generate_batch(model, tok, QUESTIONS, max_new_tokens=24, batch_size=3, progress=False)
    penalized = generate_batch(model, tok, QUESTIONS, 24, 3, progress=False, repetition_penalty=5.0)
    assert penalized.texts != plain.texts  # the penalty is applied, not dropped on the way
    # ... and it is HF's: the same as generate() with that penalty, one question at a time.
    stops = stop_token_ids(tok, model)
    prompt = torch.tensor([encode_prompts(tok, QUESTIONS[:1])[0]])
    ref = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), generation_config=GenerationConfig(
        max_new_tokens=24, do_sample=False, eos_token_id=stops, pad_token_id=stops[0], repetition_penalty=5.0))
    new = ref[0, prompt.shape[1]:].tolist()
    new = new[: next((k for k, t in enumerate(new) if t in stops), len(new))]
    assert penalized.texts[0] == tok.decode(new, skip_special_tokens=True)


def test_sampling_path_runs(tiny):
    model, tok = tiny
    out = generate_responses(model, tok, QUESTIONS[:2], 4, do_sample=True, temperature=0.7, top_p=0.9, progress=False)
    assert len(out) == 2


def test_evaluate_benchmark_in_process(tiny, compose_config):
    model, tok = tiny
    (bench,) = load_huatuo_format(FIX / "mini_mcq.json", language="es", limit=4)
    eval_cfg = compose_config("eval=custom", "eval.path=unused.json", "eval.max_new_tokens=6", "eval.batch_size=4",
                              "eval.compat_huatuo=true", "eval.progress=false", config_name="evaluate").eval
    m = evaluate_benchmark(model, tok, bench.items, eval_cfg)
    assert m["n"] == 4 and 0.0 <= m["accuracy"] <= 1.0
    for key in ("unparsed_rate", "format_compliance", "mean_output_chars", "mean_output_tokens", "tokens_per_second"):
        assert key in m
    assert m["compat_huatuo"]["label"] == "HuatuoGPT-compat (optimistic)"
    assert evaluate_benchmark(model, tok, [], eval_cfg)["n"] == 0
