"""A tokenizer's pad token: a dedicated one that is not the end-of-turn token where the vocab has one, else eos.

Labels are masked through the attention mask / assistant mask, never by comparing ids with pad_token_id; still,
a pad distinct from end-of-turn keeps any code that does compare from silently un-learning "stop" (TRL #1623).
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

# End-of-turn tokens of common chat formats; pad must differ from them where possible.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")
_PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|endoftext|>", "<pad>", "<|pad|>", "<|end_of_text|>")


def end_of_turn_token_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    vocab = tokenizer.get_vocab()
    return {vocab[t] for t in END_OF_TURN_TOKENS if t in vocab}


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase, replace_end_of_turn: bool = False) -> None:
    """Give the tokenizer a pad token (see the module doc); `replace_end_of_turn` also replaces an existing pad
    that *is* the end-of-turn token (SmolLM2's GGUF)."""
    end_of_turn = end_of_turn_token_ids(tokenizer)
    if tokenizer.pad_token is not None and not (replace_end_of_turn and tokenizer.pad_token_id in end_of_turn):
        return
    vocab = tokenizer.get_vocab()
    for candidate in _PAD_CANDIDATES + ((tokenizer.unk_token,) if tokenizer.unk_token else ()):
        if candidate in vocab and vocab[candidate] not in end_of_turn:
            tokenizer.pad_token = candidate
            return
    tokenizer.pad_token = tokenizer.eos_token
