"""SFT data: records (load + validate), render (chat template + loss mask), collate (padding), dataset (cache).

Names are imported lazily so `medsft data check` does not pay for torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Record": "records",
    "LoadReport": "records",
    "load_records": "records",
    "ensure_chat_template": "render",
    "build_messages": "render",
    "prompt_ids": "render",
    "prompt_text": "render",
    "format_response": "render",
    "render_example": "render",
    "end_of_turn_ids": "render",
    "IGNORE_INDEX": "render",
    "SFTCollator": "collate",
    "SFTData": "dataset",
    "build_sft_data": "dataset",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"medsft.data.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'medsft.data' has no attribute {name!r}")
