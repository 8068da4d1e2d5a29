"""Dynamic padding of SFT examples into batches.

Right padding to the longest example of the batch (optionally rounded up to a multiple). Padding is decided
by POSITION (beyond each example's length), never by comparing token ids to the pad id: where pad == eos
(many tokenizers), masking by id would also mask the real end-of-turn/EOS token and the model would never
learn to stop (TRL #1623).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from medsft.data.render import IGNORE_INDEX


class SFTCollator:
    def __init__(self, pad_token_id: int, pad_to_multiple_of: Optional[int] = None):
        if pad_token_id is None:
            raise ValueError(
                "SFTCollator needs a pad_token_id; set tokenizer.pad_token (e.g. to its eos token: safe here, "
                "padding is masked by position, not by id)"
            )
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of={pad_to_multiple_of} must be >= 1")
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("SFTCollator got an empty batch")
        ids = [_as_list(ex["input_ids"]) for ex in examples]
        labels = [_as_list(ex["labels"]) for ex in examples]
        for i, (a, b) in enumerate(zip(ids, labels)):
            if len(a) != len(b):
                raise ValueError(f"example {i} of the batch: {len(a)} input_ids but {len(b)} labels")
        width = max(len(a) for a in ids)
        m = self.pad_to_multiple_of
        if m:
            width = -(-width // m) * m
        n = len(ids)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((n, width), dtype=torch.long)
        out_labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        for i, (a, b) in enumerate(zip(ids, labels)):
            k = len(a)
            input_ids[i, :k] = torch.as_tensor(a, dtype=torch.long)
            attention_mask[i, :k] = 1
            out_labels[i, :k] = torch.as_tensor(b, dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": out_labels}


def _as_list(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.tolist()
    return x
