"""Padding collator: right padding, masks by position, a real EOS equal to the pad id keeps its label."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_data_support import chatml_tokenizer  # noqa: E402

from medsft.data.collate import SFTCollator  # noqa: E402
from medsft.data.records import Record  # noqa: E402
from medsft.data.render import IGNORE_INDEX, render_example  # noqa: E402


def test_right_padding_and_masks():
    batch = SFTCollator(pad_token_id=0)(
        [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_pad_equal_to_eos_keeps_the_real_eos_label(data_config):
    """SmolLM2-style tokenizer: pad == eos == <|im_end|>. The example's own <|im_end|> stays trained."""
    tok = chatml_tokenizer()
    assert tok.pad_token_id == tok.eos_token_id
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    short = render_example(tok, Record("¿Q?", "r", "a", None, 0, 1), data_config())
    long = render_example(tok, Record("¿Una pregunta más larga?", "razonamiento " * 5, "b", None, 1, 2), data_config())
    batch = SFTCollator(pad_token_id=tok.pad_token_id)([short, long])
    n = len(short["input_ids"])
    row_ids, row_labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    assert row_labels[:n] == short["labels"]
    eot_pos = [i for i in range(n) if row_ids[i] == eot and row_labels[i] != IGNORE_INDEX]
    assert len(eot_pos) == 1 and row_labels[eot_pos[0]] == eot  # the real end of turn is learned
    assert row_ids[n:] == [tok.pad_token_id] * (len(row_ids) - n)  # padding uses the same id ...
    assert row_labels[n:] == [IGNORE_INDEX] * (len(row_ids) - n)  # ... but carries no loss
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (len(row_ids) - n)


def test_pad_to_multiple_and_input_types():
    c = SFTCollator(pad_token_id=3, pad_to_multiple_of=8)
    batch = c([{"input_ids": np.array([1, 2]), "labels": np.array([1, 2])},
               {"input_ids": torch.tensor([4, 5, 6]), "labels": torch.tensor([-100, 5, 6])}])
    assert batch["input_ids"].shape == (2, 8)
    assert batch["labels"][1].tolist() == [-100, 5, 6] + [-100] * 5


def test_bad_inputs():
    with pytest.raises(ValueError, match="pad_token_id"):
        SFTCollator(pad_token_id=None)
    with pytest.raises(ValueError, match="labels"):
        SFTCollator(pad_token_id=0)([{"input_ids": [1, 2], "labels": [1]}])
    with pytest.raises(ValueError, match="empty batch"):
        SFTCollator(pad_token_id=0)([])
