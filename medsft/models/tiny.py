"""`tiny-random:llama` (and `tiny-random:qwen2`): a randomly initialised model of shape `model.tiny` with a
byte-level BPE tokenizer trained locally on the bundled data; built once into `<models>/tiny-random-<arch>-<hash>/`
and loaded like any Hub model. For tests and quick plumbing checks."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from medsft.config import TinyModelShape
from medsft.data.templates import FINAL_RESPONSE_HEADER, LLAMA3_CHAT_TEMPLATE, LLAMA3_SPECIAL_TOKENS, THINKING_HEADER
from medsft.errors import ModelSourceError
from medsft.models.cache import build_once, models_dir
from medsft.paths import DEMO_DATA

log = logging.getLogger(__name__)

TINY_RANDOM = "tiny-random:llama"
TINY_RANDOM_QWEN2 = "tiny-random:qwen2"
TINY_SOURCES = (TINY_RANDOM, TINY_RANDOM_QWEN2)
# Bump when the tiny builder's output changes, so stale caches are not reused.
TINY_BUILDER_VERSION = "tiny-v1"

# Tokenizer corpus when data/demo_data.json is absent or unreadable: short Spanish/English medical paragraphs in
# the response layout the model is trained on, so the tiny tokenizer learns the words the tests use.
_FALLBACK_CORPUS = (
    "Paciente de 45 años con dolor torácico opresivo irradiado al brazo izquierdo, sudoración y disnea. "
    "El electrocardiograma muestra elevación del segmento ST en derivaciones inferiores.",
    "## Thinking\n\nLa fiebre, la tos productiva y la consolidación en la radiografía sugieren una neumonía "
    "adquirida en la comunidad. Debo valorar la gravedad con la escala CURB-65.\n\n## Final Response\n\n"
    "El diagnóstico más probable es neumonía; se recomienda tratamiento antibiótico empírico.",
    "¿Cuál es el tratamiento de primera línea de la hipertensión arterial en un paciente diabético? "
    "Los inhibidores de la enzima convertidora de angiotensina protegen la función renal.",
    "Mujer de 30 años con poliuria, polidipsia y pérdida de peso. La glucemia en ayunas es de 250 mg/dL. "
    "Se sospecha diabetes mellitus tipo 1 y se solicita hemoglobina glicosilada.",
    "## Thinking\n\nEl niño presenta exantema, fiebre alta y conjuntivitis; hay que descartar sarampión y "
    "enfermedad de Kawasaki.\n\n## Final Response\n\nSe debe solicitar ecocardiograma y serología.",
    "A 60-year-old man presents with sudden painless loss of vision in one eye. Fundoscopy shows a cherry-red "
    "spot, consistent with central retinal artery occlusion.",
    "## Thinking\n\nThe patient has fatigue, pallor and low ferritin, which points to iron deficiency anemia."
    "\n\n## Final Response\n\nIron deficiency anemia; look for the source of blood loss.",
    "La insuficiencia cardíaca se trata con diuréticos, betabloqueantes e inhibidores del sistema "
    "renina-angiotensina. El pronóstico depende de la fracción de eyección del ventrículo izquierdo.",
)


def _tiny_shape(tiny: TinyModelShape | Mapping | None) -> TinyModelShape:
    """Normalise `model.tiny` (the config node, a dataclass or a dict) and check it describes a valid model."""
    if tiny is None:
        raise ModelSourceError("a tiny-random model needs its shape: model.tiny (conf/model/base.yaml)")
    if isinstance(tiny, TinyModelShape):
        shape = tiny
    else:
        values = dict(tiny.items())
        known = {f.name for f in dataclasses.fields(TinyModelShape)}
        unknown, missing = sorted(set(values) - known), sorted(known - set(values))
        if unknown or missing:
            raise ModelSourceError(f"model.tiny: unknown keys {unknown}, missing keys {missing}; "
                                   f"its keys: {sorted(known)}")
        shape = TinyModelShape(**{k: int(v) for k, v in values.items()})
    if shape.hidden_size % shape.num_attention_heads:
        raise ModelSourceError("model.tiny.hidden_size must be a multiple of model.tiny.num_attention_heads")
    if shape.num_attention_heads % shape.num_key_value_heads:
        raise ModelSourceError("model.tiny.num_attention_heads must be a multiple of model.tiny.num_key_value_heads")
    minimum = 256 + len(tiny_special_tokens()) + 1  # byte alphabet + specials + at least one merge
    if shape.vocab_size < minimum:
        raise ModelSourceError(f"model.tiny.vocab_size={shape.vocab_size} must be >= {minimum} (byte-level BPE)")
    return shape


def tiny_special_tokens() -> list[str]:
    named = [LLAMA3_SPECIAL_TOKENS[k] for k in ("bos_token", "eos_token", "pad_token")]
    return named + list(LLAMA3_SPECIAL_TOKENS["additional"])


def _json_strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, Mapping):
        for value in node.values():
            yield from _json_strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _json_strings(value)


def default_tiny_corpus(max_chars: int = 2_000_000) -> list[str]:
    """Texts the tiny tokenizer is trained on: the demo data's strings (or the built-in fallback) + headers."""
    texts: list[str] = []
    path = DEMO_DATA
    try:
        texts = list(_json_strings(json.loads(path.read_text(encoding="utf-8"))))
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as err:  # e.g. being written right now by someone else
        log.warning("tiny tokenizer: cannot read %s (%s); using the built-in corpus", path, err)
    if not texts:
        texts = list(_FALLBACK_CORPUS)
    kept, total = [], 0
    for text in texts:  # cap so a large data file cannot make the "seconds" build slow
        if total >= max_chars:
            break
        kept.append(text)
        total += len(text)
    return kept + [THINKING_HEADER, FINAL_RESPONSE_HEADER]


def _corpus_hash(texts: list[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8") + b"\0")
    return digest.hexdigest()


def _train_tiny_tokenizer(corpus_texts: list[str], vocab_size: int, max_length: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (no unknown tokens possible) with the Llama-3 special tokens and chat template."""
    specials = tiny_special_tokens()  # ids 0.. in this order: bos, eos, pad, then the others
    bos = LLAMA3_SPECIAL_TOKENS["bos_token"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_texts, trainer=trainer)
    # Like Llama-3: plain tokenization prepends <|begin_of_text|> (chat templates already contain it, and
    # apply_chat_template tokenizes without special tokens). ByteLevel first keeps character offsets right,
    # which return_assistant_tokens_mask relies on.
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
            ),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=LLAMA3_SPECIAL_TOKENS["eos_token"],
        pad_token=LLAMA3_SPECIAL_TOKENS["pad_token"],
        extra_special_tokens=list(LLAMA3_SPECIAL_TOKENS["additional"]),
        chat_template=LLAMA3_CHAT_TEMPLATE,
        model_max_length=max_length,
        clean_up_tokenization_spaces=False,
    )


def _tiny_model(arch: str, shape: TinyModelShape, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[arch]
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = config_cls(**dataclasses.asdict(shape), tie_word_embeddings=True, **ids)
    model = model_cls(config)
    # As Llama-3.x instruct: generation stops at end-of-turn or end-of-text.
    end_of_text = tokenizer.convert_tokens_to_ids("<|end_of_text|>")
    model.generation_config = GenerationConfig(**{**ids, "eos_token_id": [ids["eos_token_id"], end_of_text]})
    return model


def build_tiny_random(
    out_dir: str | os.PathLike,
    shape: TinyModelShape | Mapping | None = None,
    corpus_texts: list[str] | None = None,
    seed: int = 0,
    arch: str = "llama",
) -> str:
    """Build a random `arch` ("llama" | "qwen2") causal LM + BPE tokenizer into `out_dir` (no caching here).

    Same (shape, corpus, seed, arch) -> identical files. The global torch RNG is left as it was.
    Takes ~0.1 s for the default shape (hidden 64, 2 layers, vocab 512) on 2 CPUs, ~0.8 s for the first
    build in a process (lazy imports); the `transformers` import itself is ~6 s.
    """
    if arch not in ("llama", "qwen2"):
        raise ModelSourceError(f"tiny-random arch {arch!r} is not one of ['llama', 'qwen2']")
    shape = _tiny_shape(shape)
    corpus_texts = default_tiny_corpus() if corpus_texts is None else list(corpus_texts)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tiny_tokenizer(corpus_texts, shape.vocab_size, shape.max_position_embeddings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _tiny_model(arch, shape, tokenizer)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def _tiny_cache_key(arch: str, shape: TinyModelShape, corpus_texts: list[str], seed: int) -> str:
    key = {
        "builder": TINY_BUILDER_VERSION,
        "arch": arch,
        "shape": dataclasses.asdict(shape),
        "corpus_sha256": _corpus_hash(corpus_texts),
        "seed": seed,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def prepare_tiny(arch: str, cache_dir: str | os.PathLike | None, tiny: Any, seed: int = 0) -> str:
    shape = _tiny_shape(tiny)
    corpus = default_tiny_corpus()
    key = _tiny_cache_key(arch, shape, corpus, seed)
    final_dir = models_dir(cache_dir) / f"tiny-random-{arch}-{key}"

    def build(tmp_dir: Path) -> dict:
        build_tiny_random(tmp_dir, shape, corpus, seed=seed, arch=arch)
        return {"source": f"tiny-random:{arch}", "key": key, "shape": dataclasses.asdict(shape), "seed": seed}

    return str(build_once(final_dir, build))
