"""Known, harmless lines that the libraries under medsft print, dropped so the user's console shows what matters.

Every filter names exactly what it drops and why it is safe; anything else those loggers say still shows:

- DeepSpeed's "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it."
  DeepSpeed prints it (on stdout) whenever it is imported on a machine without CUDA, and transformers and
  accelerate import it whenever it is installed: a model's `save_pretrained` (`medsft data stats` building the
  tiny test model), `accelerator.unwrap_model` (every run), `medsft launch-config`. medsft logs the device it
  trains on itself ("processes: 1, device: cpu").
- accelerate's per-checkpoint INFO lines ("Saving current state to ...", "Model weights saved in ...",
  "Optimizer state saved in ...", "Random states saved in ...", "Saving the state of LambdaLR ...", under
  DeepSpeed "Saving DeepSpeed Model and Optimizer", and their "Loading ..." counterparts on resume): medsft
  logs one line per checkpoint and per resume.
- accelerate's "Removed shared tensor {'lm_head.weight'} while saving" warning: a model with tied input and
  output embeddings (SmolLM2, the tiny test model, Llama-3.2-1B) stores the shared matrix once in the training
  state; accelerate's load_state restores the tie (tests/test_resume.py resumes such models bitwise). A shared
  tensor of any other name is still reported.
- the compiler probes DeepSpeed runs when it starts (INFO lines `gcc ... test.c -laio` of the logger
  `compilers.C.base`): its check whether async I/O ops could be built; warnings and errors still show.
- transformers' "Writing model shards" progress bar at each checkpoint save (`quiet_checkpoint_save`).

`quiet_third_party_logs` is installed once per process by the entry points (`medsft ...`, `python launch.py`).
"""

from __future__ import annotations

import contextlib
import logging
import re
from typing import Iterator

DEEPSPEED_CPU_NOTICE = "Setting accelerator to CPU"
_ACCELERATE_STATE_LINES = ("Saving current state to", "Loading states from", "Saving the state of",
                           "Loading the state of", "DeepSpeed Model and Optimizer")
_SHARED_TENSOR = re.compile(r"Removed shared tensor \{(?P<names>[^}]*)\} while saving")
TIED_OUTPUT_EMBEDDINGS = ("lm_head.weight",)


class _DropDeepSpeedCpuNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(DEEPSPEED_CPU_NOTICE)


class _DropCheckpointChatter(logging.Filter):
    """accelerate's INFO lines about saving and loading the training state (never a warning)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        if record.name == "accelerate.checkpointing":
            return False
        return not any(line in str(record.getMessage()) for line in _ACCELERATE_STATE_LINES)


class _DropInfo(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


class _DropTiedEmbeddingNotice(logging.Filter):
    """The shared-tensor warning when the only shared tensor is the tied output embedding."""

    def filter(self, record: logging.LogRecord) -> bool:
        match = _SHARED_TENSOR.search(str(record.getMessage()))
        if not match:
            return True
        names = {n.strip().strip("'\"") for n in match.group("names").split(",") if n.strip()}
        return not (names and all(n.endswith(TIED_OUTPUT_EMBEDDINGS) for n in names))


_FILTERS = {
    "DeepSpeed": _DropDeepSpeedCpuNotice(),
    "accelerate.checkpointing": _DropCheckpointChatter(),
    "accelerate.accelerator": _DropCheckpointChatter(),
    "accelerate.utils.other": _DropTiedEmbeddingNotice(),
    "compilers.C.base": _DropInfo(),
}


def quiet_third_party_logs() -> None:
    """Attach the filters above to their loggers (idempotent). A logger's filters survive Hydra's logging setup
    and DeepSpeed's own logger creation (both only set levels and handlers)."""
    for name, flt in _FILTERS.items():
        logger = logging.getLogger(name)
        if flt not in logger.filters:
            logger.addFilter(flt)


@contextlib.contextmanager
def quiet_checkpoint_save() -> Iterator[None]:
    """No transformers progress bar ("Writing model shards") while a checkpoint is written."""
    # transformers.utils (~0.8 s): every `medsft` command imports this module, few of them save a model.
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
