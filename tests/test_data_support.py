"""Shared helpers of the data tests: small real tokenizers (byte-level BPE trained here in about a second),
the shared-data location, and record writers. Imported by the other tests/test_data_*.py modules.

Three tokenizer families, as the data pipeline must handle them:
  * llama3: Llama-3 special tokens and the Llama-3 chat template (from medsft.data.templates);
  * chatml: SmolLM2's ChatML template (`<|im_start|>role\\ncontent<|im_end|>\\n`, default system turn),
    with pad == eos == <|im_end|> (as SmolLM2-Instruct ships);
  * plain: no chat template and none of the Llama-3 control tokens (a base model's tokenizer).
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import pytest

import medsft

REPO_ROOT = Path(medsft.__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "data"
BROKEN = FIXTURES / "broken"

LLAMA3_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|finetune_right_pad_id|>",
]
CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# SmolLM2-135M-Instruct's chat template.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Llama-3's pre-tokenization regex, so merges behave like the real tokenizer's.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)


def shared_data_dir() -> Path:
    env = os.environ.get("MEDSFT_SHARED_DATA")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


def shared_file(rel: str) -> Path:
    """A file of ../shared/data, or skip the test saying why."""
    p = shared_data_dir() / rel
    if not p.exists():
        pytest.skip(f"shared public data not found: {p} (set MEDSFT_SHARED_DATA to the shared/data folder)")
    return p


def _corpus() -> list[str]:
    texts = []
    demo = REPO_ROOT / "data" / "demo_data.json"
    sources = [demo, FIXTURES / "es_small.json"]
    for src in sources:
        if src.exists():
            try:
                for rec in json.loads(src.read_text(encoding="utf-8")):
                    texts.extend(str(v) for v in rec.values())
            except (ValueError, AttributeError):
                pass
    texts.append("## Thinking\n\n## Final Response\n\nsystem user assistant You are a helpful AI assistant")
    return texts


@functools.lru_cache(maxsize=None)
def _bpe_json(specials: tuple[str, ...], vocab_size: int) -> str:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    return tok.to_str()


def _wrap(specials: tuple[str, ...], vocab_size: int, name: str, **kwargs):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_bpe_json(specials, vocab_size)),
        clean_up_tokenization_spaces=False,
        **kwargs,
    )
    tok.name_or_path = name
    return tok


def llama3_tokenizer():
    from medsft.data.templates import LLAMA3_CHAT_TEMPLATE

    tok = _wrap(
        tuple(LLAMA3_SPECIALS + CHATML_SPECIALS), 700, "test-bpe-llama3",
        bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<|finetune_right_pad_id|>",
    )
    tok.chat_template = LLAMA3_CHAT_TEMPLATE
    return tok


def chatml_tokenizer():
    tok = _wrap(
        tuple(LLAMA3_SPECIALS + CHATML_SPECIALS), 700, "test-bpe-chatml",
        eos_token="<|im_end|>", pad_token="<|im_end|>", unk_token=None,
    )
    tok.chat_template = CHATML_TEMPLATE
    return tok


def plain_tokenizer():
    """No chat template, no Llama-3 control tokens (like a base model's tokenizer)."""
    return _wrap(("<|endoftext|>",), 400, "test-bpe-plain", eos_token="<|endoftext|>")


TOKENIZERS = {"llama3": llama3_tokenizer, "chatml": chatml_tokenizer}


def end_of_turn_text(family: str) -> str:
    return {"llama3": "<|eot_id|>", "chatml": "<|im_end|>"}[family]


def write_json(path: Path, records: list, jsonl: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if jsonl:
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    else:
        path.write_text(json.dumps(records, ensure_ascii=False, indent=2), encoding="utf-8")
    return path


def es_record(i: int, **over) -> dict:
    rec = {
        "Pregunta": f"Paciente {i} con fiebre y tos de {i % 9 + 2} días. ¿Cuál es el diagnóstico más probable?",
        "Razonamiento_Complejo": f"Veamos: fiebre y tos sugieren una infección respiratoria. Caso {i}. "
        "Primero descarto neumonía con la auscultación.\n\nLuego valoro la saturación.",
        "Respuesta": f"Bronquitis aguda, caso {i}; tratamiento sintomático.",
        "Archivo_fuente": "tests",
    }
    rec.update(over)
    return rec


def python_cmd() -> list[str]:
    return [sys.executable]


def test_tokenizers_round_trip():
    """The helpers' tokenizers are real byte-level BPEs: lossless, with single-token control tokens."""
    for family, make in TOKENIZERS.items():
        tok = make()
        text = "Hola ñandú, ¿qué tal? 😀\n\n## Thinking " + end_of_turn_text(family)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
        assert tok.convert_tokens_to_ids(end_of_turn_text(family)) in ids
    assert plain_tokenizer().chat_template is None
