"""Batched generation for evaluation and the training demo's before/after check.

* Prompts go through `medsft.data.render.prompt_ids`: the very chat rendering training uses, so there is no
  train/eval template mismatch.
* transformers backend (default): batches of prompts LEFT-padded by hand (sorted by length to waste little
  padding), greedy unless do_sample, stopping at eos or the end-of-turn token the model was trained to emit;
  an optional repetition penalty (CTRL's: logits of tokens already seen divided by it) applies to both modes.
  Works on CPU, on a bare model or one wrapped by DDP/DeepSpeed/accelerate/torch.compile (unwrapped here),
  and leaves the model's train/eval mode and the tokenizer's padding_side as they were.
* vLLM backend (optional, GPU): `generate_vllm`, only when the `vllm` package is installed.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig

from medsft.data.render import end_of_turn_ids, prompt_ids
from medsft.errors import ConfigError
from medsft.eval.format import check_format
from medsft.eval.language import language_counts

log = logging.getLogger(__name__)

# End-of-turn / end-of-text tokens of common chat formats; the ones the vocabulary has are stop tokens too.
_STOP_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "</s>", "<|end|>", "<end_of_turn>")


@dataclass
class GenerationResult:
    texts: list[str]
    new_tokens: list[int]  # generated tokens per answer, stop token excluded
    truncated: list[bool]  # hit max_new_tokens without a stop token
    prompt_tokens: list[int]
    seconds: float = 0.0
    backend: str = "transformers"
    extra: dict = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        return sum(self.new_tokens) / self.seconds if self.seconds > 0 else 0.0


def unwrap_model(model: Any) -> Any:
    """The bare HF model inside DDP / DeepSpeed / accelerate / torch.compile wrappers."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(getattr(model, "module"), torch.nn.Module):
            model = model.module  # DDP, DeepSpeedEngine, accelerate wrappers
    return model


def stop_token_ids(tokenizer: Any, model: Any = None, system_prompt: Optional[str] = None) -> list[int]:
    """eos, the end-of-turn token the chat template closes assistant turns with, and known stop tokens."""
    ids: list[int] = []

    def add(x: Any) -> None:
        if x is None:
            return
        for i in x if isinstance(x, (list, tuple, set)) else [x]:
            if isinstance(i, int) and i >= 0 and i not in ids:
                ids.append(i)

    add(getattr(tokenizer, "eos_token_id", None))
    gen_cfg = getattr(model, "generation_config", None) if model is not None else None
    add(getattr(gen_cfg, "eos_token_id", None))
    try:
        add(end_of_turn_ids(tokenizer, system_prompt))
    except Exception as err:  # a template that cannot render a probe still has eos
        log.debug("no end-of-turn token from the chat template: %s", err)
    vocab = tokenizer.get_vocab()
    add([vocab[t] for t in _STOP_TOKENS if t in vocab])
    if not ids:
        raise ConfigError("the tokenizer has no eos/end-of-turn token: generation would never stop")
    return ids


def encode_prompts(tokenizer: Any, questions: Sequence[str], system_prompt: Optional[str] = None) -> list[list[int]]:
    return [prompt_ids(tokenizer, q, system_prompt) for q in questions]


def _progress(total: int, enabled: bool, desc: str):
    return tqdm(total=total, disable=not enabled, desc=desc, unit="q", dynamic_ncols=True, leave=False)


def generate_batch(
    model: Any,
    tokenizer: Any,
    questions: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 8,
    system_prompt: Optional[str] = None,
    do_sample: bool = False,
    temperature: float = 0.6,
    top_p: float = 0.9,
    progress: bool = True,
    seed: Optional[int] = None,
    desc: str = "generate",
    repetition_penalty: float = 1.0,
) -> GenerationResult:
    """Generate one answer per question with the transformers backend; see the module doc."""
    if max_new_tokens < 1 or batch_size < 1:
        raise ConfigError(f"max_new_tokens ({max_new_tokens}) and batch_size ({batch_size}) must be >= 1")
    bare = unwrap_model(model)
    stops = stop_token_ids(tokenizer, bare, system_prompt)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    prompts = encode_prompts(tokenizer, questions, system_prompt)
    gen_cfg = GenerationConfig(
        max_new_tokens=int(max_new_tokens),
        do_sample=bool(do_sample),
        eos_token_id=stops,
        pad_token_id=pad_id,
        use_cache=True,
        **({"temperature": float(temperature), "top_p": float(top_p)} if do_sample else {}),
        **({"repetition_penalty": float(repetition_penalty)} if repetition_penalty != 1.0 else {}),
    )
    device = next(bare.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # longest first: OOM shows early
    texts: list[str] = [""] * len(prompts)
    n_new, truncated = [0] * len(prompts), [False] * len(prompts)
    was_training = bare.training
    old_side = getattr(tokenizer, "padding_side", None)
    bar = _progress(len(prompts), progress, desc)
    start = time.perf_counter()
    try:
        tokenizer.padding_side = "left"
        bare.eval()
        if seed is not None and do_sample:
            torch.manual_seed(seed)
        stop_set = set(stops)
        for b in range(0, len(order), batch_size):
            idx = order[b : b + batch_size]
            width = max(len(prompts[i]) for i in idx)
            input_ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):  # left padding: the prompt ends where generation starts
                ids = prompts[i]
                input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                attention[row, width - len(ids) :] = 1
            with torch.inference_mode():
                out = bare.generate(
                    input_ids=input_ids.to(device), attention_mask=attention.to(device), generation_config=gen_cfg
                )
            new = out[:, width:].tolist()
            for row, i in enumerate(idx):
                seq = new[row]
                cut = next((k for k, t in enumerate(seq) if t in stop_set), None)
                kept = seq if cut is None else seq[:cut]
                kept = [t for t in kept if t != pad_id] if cut is None else kept
                texts[i] = tokenizer.decode(kept, skip_special_tokens=True)
                n_new[i] = len(kept)
                truncated[i] = cut is None and len(seq) >= max_new_tokens
            if bar is not None:
                bar.update(len(idx))
    finally:
        if bar is not None:
            bar.close()
        if old_side is not None:
            tokenizer.padding_side = old_side
        if was_training:
            bare.train()
    return GenerationResult(
        texts=texts,
        new_tokens=n_new,
        truncated=truncated,
        prompt_tokens=[len(p) for p in prompts],
        seconds=time.perf_counter() - start,
    )


def generate_responses(
    model: Any, tokenizer: Any, questions: list[str], max_new_tokens: int, batch_size: int = 8, **options: Any
) -> list[str]:
    """Decoded new text (special tokens skipped) for each question, in order; `options` are `generate_batch`'s
    (system_prompt, do_sample, temperature, top_p, progress, repetition_penalty, ...)."""
    return generate_batch(model, tokenizer, questions, max_new_tokens, batch_size, **options).texts


def summarize_generations(texts: list[str], tokenizer: Any = None) -> dict:
    """n, n_compliant, format_compliance (rate), has_thinking / has_final (rates), mean_chars, n_spanish /
    n_english (answers written in each, medsft.eval.language), and mean_tokens when a tokenizer is given (answers
    re-tokenized without special tokens)."""
    n = len(texts)
    checks = [check_format(t) for t in texts]
    languages = language_counts(texts)
    out = {
        "n": n,
        "n_compliant": sum(c.compliant for c in checks),
        "format_compliance": sum(c.compliant for c in checks) / n if n else 0.0,
        "has_thinking": sum(c.has_thinking for c in checks) / n if n else 0.0,
        "has_final": sum(c.has_final for c in checks) / n if n else 0.0,
        "mean_chars": sum(len(t) for t in texts) / n if n else 0.0,
        "n_spanish": languages["es"],
        "n_english": languages["en"],
    }
    if tokenizer is not None:
        lens = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts] if n else []
        out["mean_tokens"] = sum(lens) / n if n else 0.0
    return out


# --------------------------------------------------------------------------------------------------- vLLM


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def generate_vllm(
    model_dir: str,
    tokenizer: Any,
    questions: Sequence[str],
    max_new_tokens: int,
    system_prompt: Optional[str] = None,
    do_sample: bool = False,
    temperature: float = 0.6,
    top_p: float = 0.9,
    seed: Optional[int] = None,
    dtype: str = "auto",
    tensor_parallel_size: int = 1,
    gpu_memory_utilization: float = 0.9,
    max_model_len: Optional[int] = None,
    repetition_penalty: float = 1.0,
) -> GenerationResult:
    """Generate with vLLM from the same prompt token ids as the transformers backend (GPU; optional extra)."""
    if not vllm_available():
        raise ConfigError(
            "eval.backend=vllm needs the vllm package (`pip install vllm`, CUDA GPU); it is not installed here. "
            "Use eval.backend=transformers (the default), which works everywhere."
        )
    from vllm import LLM, SamplingParams  # type: ignore[import-not-found]  # optional, GPU only

    prompts = encode_prompts(tokenizer, questions, system_prompt)
    stops = stop_token_ids(tokenizer, None, system_prompt)
    llm_kwargs: dict[str, Any] = {
        "model": model_dir,
        "tokenizer": model_dir,
        "dtype": dtype,
        "tensor_parallel_size": int(tensor_parallel_size),
        "gpu_memory_utilization": float(gpu_memory_utilization),
        "seed": int(seed or 0),
    }
    if max_model_len:
        llm_kwargs["max_model_len"] = int(max_model_len)
    llm = LLM(**llm_kwargs)
    params = SamplingParams(
        max_tokens=int(max_new_tokens),
        temperature=float(temperature) if do_sample else 0.0,
        top_p=float(top_p) if do_sample else 1.0,
        stop_token_ids=stops,
        skip_special_tokens=True,
        seed=seed if do_sample else None,
        repetition_penalty=float(repetition_penalty),
    )
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    seconds = time.perf_counter() - start
    texts, n_new, truncated = [], [], []
    for o in outputs:
        c = o.outputs[0]
        texts.append(c.text)
        n_new.append(len(c.token_ids))
        truncated.append(c.finish_reason == "length")
    return GenerationResult(texts, n_new, truncated, [len(p) for p in prompts], seconds, backend="vllm")
