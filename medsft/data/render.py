"""Records -> chat-formatted token ids with loss labels, through the tokenizer's own chat template.

One conversation per record: [system?] + user(question) + assistant(response layout). The prompt is the
conversation without the assistant turn, rendered with add_generation_prompt=True: exactly what evaluation and
generation feed the model (`prompt_ids`), so training and inference can never disagree on the template.

Labels (what carries loss), checked for every example:
  * every prompt token: -100. The prompt's ids must be an exact prefix of the full conversation's ids, or the
    template is rejected (the classic TRL "response key not found" / empty-mask bug);
  * the assistant content (the HuatuoGPT-o1 layout) and the end-of-turn token the template closes the turn
    with (`<|eot_id|>`, `<|im_end|>`): their ids, so the model learns to stop;
  * anything the template writes after the end-of-turn token (ChatML's trailing "\n"): -100.
The end-of-turn token is located as the first special token after the content (by character offsets of the
fast tokenizer); a template that closes the assistant turn without one is rejected.

Speed: the chat template renders text (`apply_chat_template(tokenize=False)`, batched), then the full texts are
tokenized in one batched call (parallel in the Rust tokenizer). That is the very call
`apply_chat_template(tokenize=True)` makes (`tokenizer(text, add_special_tokens=False)`), so ids are identical
(tests compare both paths). The prompts' ids are read off the full ids where provably equal (see
`_derive_prompt_ids`), else tokenized on their own; either way they are checked against the full ids.
"""

from __future__ import annotations

import logging
import re
from bisect import bisect_left
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from tokenizers import AddedToken

from medsft.data.records import Record
from medsft.data.templates import DEFAULT_RESPONSE_TEMPLATE, LLAMA3_CHAT_TEMPLATE, LLAMA3_SPECIAL_TOKENS
from medsft.errors import DataError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
_PLACEHOLDER = re.compile(r"\{reasoning\}|\{response\}")
_TOLD: set[str] = set()  # tokenizers already told about the assigned template


def ensure_chat_template(tokenizer: Any) -> bool:
    """Give a tokenizer without a chat template the Llama-3 one; True if it was assigned (logged once).

    The Llama-3 template's control tokens are added as special tokens when the vocabulary lacks them, so
    that they are single, unsplittable tokens; the model's embeddings must then be resized to
    `len(tokenizer)` (logged as a warning).
    """
    if getattr(tokenizer, "chat_template", None):
        return False
    tokenizer.chat_template = LLAMA3_CHAT_TEMPLATE
    needed = ["<|start_header_id|>", "<|end_header_id|>", LLAMA3_SPECIAL_TOKENS["eos_token"]]  # <|eot_id|>
    vocab = tokenizer.get_vocab()
    missing = [t for t in needed if t not in vocab]
    if missing:
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    if name not in _TOLD:
        _TOLD.add(name)
        log.warning(
            "tokenizer %s has no chat template: assigned the Llama-3 template%s",
            name,
            f" and added the special tokens {missing}; resize the model's embeddings to len(tokenizer)="
            f"{len(tokenizer)}" if missing else "",
        )
    return True


def build_messages(question: str, system_prompt: Optional[str] = None) -> list[dict]:
    """The prompt conversation: optional system turn, then the user's question."""
    messages = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    messages.append({"role": "user", "content": question})
    return messages


def format_response(template: str, reasoning: str, response: str) -> str:
    """The assistant turn's text: the response layout with the record's reasoning and answer filled in.

    Plain substitution (not str.format), so braces in the layout or in medical text are never interpreted.
    Surrounding whitespace is stripped (the Llama-3 template trims message content anyway).
    """
    values = {"{reasoning}": reasoning, "{response}": response}
    return _PLACEHOLDER.sub(lambda m: values[m.group(0)], template).strip()


def _render_texts(tokenizer: Any, convs: list[list[dict]], generation_prompt: bool) -> list[str]:
    try:
        out = tokenizer.apply_chat_template(convs, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as err:  # jinja errors (e.g. templates that refuse a system turn)
        raise DataError(f"the chat template of {getattr(tokenizer, 'name_or_path', '?')} failed: {err}") from None
    return [out] if isinstance(out, str) else list(out)


def prompt_text(tokenizer: Any, question: str, system_prompt: Optional[str] = None) -> str:
    """The generation prompt as text (the same rendering as training)."""
    ensure_chat_template(tokenizer)
    return _render_texts(tokenizer, [build_messages(question, system_prompt)], True)[0]


def prompt_ids(tokenizer: Any, question: str, system_prompt: Optional[str] = None) -> list[int]:
    """Token ids of the generation prompt for `question`: exactly the prompt part of the training examples."""
    text = prompt_text(tokenizer, question, system_prompt)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass
class Rendered:
    """A tokenized conversation before the length policy: ids[:prompt_len] is the prompt, ids[prompt_len:loss_end]
    the assistant content plus its end-of-turn token, ids[loss_end:] what the template writes after it."""

    ids: list[int]
    prompt_len: int
    loss_end: int


def _special_ids(tokenizer: Any) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    ids.update(i for i, tok in decoder.items() if getattr(tok, "special", False))
    return ids


def render_records(
    tokenizer: Any,
    records: Sequence[Record],
    response_template: str,
    system_prompt: Optional[str],
    exact_prompts: bool = False,
) -> list[Rendered]:
    """Render and tokenize a batch of records (batched tokenizer calls); DataError names the record.

    No length policy here (see `apply_length_policy`), so the result can be cached independently of it.
    exact_prompts=True tokenizes every prompt on its own instead of deriving its ids (see `_derive_prompt_ids`).
    """
    if not records:
        return []
    ensure_chat_template(tokenizer)
    prompts = [build_messages(r.question, system_prompt) for r in records]
    contents = [format_response(response_template, r.reasoning, r.response) for r in records]
    prompt_texts = _render_texts(tokenizer, prompts, True)
    full_texts = _render_texts(
        tokenizer, [p + [{"role": "assistant", "content": c}] for p, c in zip(prompts, contents)], False
    )
    enc_full = tokenizer(full_texts, add_special_tokens=False, return_offsets_mapping=True,
                         return_attention_mask=False, return_token_type_ids=False)
    full_ids, full_offsets = enc_full["input_ids"], enc_full["offset_mapping"]
    special = _special_ids(tokenizer)
    if exact_prompts:
        p_ids: list = [None] * len(records)
    else:
        p_ids = _derive_prompt_ids(tokenizer, prompt_texts, full_texts, full_ids, full_offsets, special)
    todo = [i for i, x in enumerate(p_ids) if x is None]
    if todo:
        exact = tokenizer([prompt_texts[i] for i in todo], add_special_tokens=False, return_attention_mask=False,
                          return_token_type_ids=False)["input_ids"]
        for i, ids in zip(todo, exact):
            p_ids[i] = ids
    return [
        _labels_for(rec, prompt_texts[i], full_texts[i], contents[i], p_ids[i], full_ids[i], full_offsets[i],
                    special, tokenizer)
        for i, rec in enumerate(records)
    ]


def _derive_prompt_ids(
    tokenizer: Any,
    prompt_texts: list[str],
    full_texts: list[str],
    full_ids: list[list[int]],
    full_offsets: list[list[tuple[int, int]]],
    special: set[int],
) -> list[Optional[list[int]]]:
    """The prompt's token ids, read off the full conversation's tokens where that is provably the same; None
    where the prompt must be tokenized on its own.

    Fast tokenizers split text at added/special tokens first and tokenize the pieces between them independently.
    So the prompt's tokens up to its last special token are exactly the conversation's; only the piece after
    it (template text such as "assistant\n" or "\n\n", the same for every record) is tokenized, once per
    distinct piece. The first record of each batch is also tokenized in full as a check of that premise for
    this tokenizer; if it fails, every prompt is tokenized on its own. Saves ~15-25% of tokenization.
    """
    out: list[Optional[list[int]]] = [None] * len(prompt_texts)
    pieces: dict[str, list[int]] = {}
    for i, (p_text, f_text, ids, offs) in enumerate(zip(prompt_texts, full_texts, full_ids, full_offsets)):
        n_chars = len(p_text)
        if not f_text.startswith(p_text):
            continue
        k = bisect_left(offs, n_chars, key=lambda o: o[0])  # first token starting at/after the prompt's end
        if k == 0 or offs[k - 1][1] > n_chars:
            continue  # a token straddles the boundary: the exact path reports it
        s = k - 1
        while s >= 0 and ids[s] not in special and k - s <= 64:
            s -= 1
        if s < 0 or ids[s] not in special:
            continue
        piece = p_text[offs[s][1] : n_chars]
        if piece not in pieces:
            pieces[piece] = list(tokenizer(piece, add_special_tokens=False)["input_ids"]) if piece else []
        if ids[s + 1 : k] == pieces[piece]:
            out[i] = ids[:k]
    first = next((i for i, x in enumerate(out) if x is not None), None)
    if first is not None:
        exact = list(tokenizer(prompt_texts[first], add_special_tokens=False)["input_ids"])
        if exact != out[first]:
            log.debug("prompt ids cannot be derived for %s; tokenizing prompts on their own",
                      getattr(tokenizer, "name_or_path", "?"))
            return [None] * len(prompt_texts)
    return out


def _labels_for(
    rec: Record,
    p_text: str,
    f_text: str,
    content: str,
    p_ids: list[int],
    f_ids: list[int],
    offsets: list[tuple[int, int]],
    special: set[int],
    tokenizer: Any,
) -> Rendered:
    name = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
    if not f_text.startswith(p_text):
        raise DataError(
            f"{rec.where()}: the chat template of {name} does not render the prompt (add_generation_prompt=True) "
            "as a prefix of the full conversation, so the response cannot be located and generation would not "
            "see the training prompt; use a template whose generation prompt is a prefix (e.g. Llama-3, ChatML)"
        )
    n_p = len(p_ids)
    if f_ids[:n_p] != list(p_ids):
        raise DataError(
            f"{rec.where()}: with {name}, the prompt's token ids are not a prefix of the full conversation's ids "
            "(the tokenizer merges the end of the prompt with the start of the response), so prompt and "
            "response cannot be separated; change data.response_template's start or the chat template"
        )
    start = f_text.find(content, len(p_text))
    if start < 0:
        raise DataError(
            f"{rec.where()}: the chat template of {name} changes the assistant's text (it is not found verbatim "
            "in the rendered conversation), so what is trained would differ from the data"
        )
    content_end = start + len(content)
    # First token at or after the content's end, scanning back from the end (the tail is a few tokens).
    first = len(f_ids)
    while first > n_p and offsets[first - 1][0] >= content_end:
        first -= 1
    loss_end = None
    for t in range(first, min(len(f_ids), first + 8)):  # template text before the end-of-turn token carries loss
        if f_ids[t] in special:
            loss_end = t + 1
            break
    if loss_end is None:
        raise DataError(
            f"{rec.where()}: the chat template of {name} does not close the assistant turn with a special "
            "end-of-turn token (like <|eot_id|> or <|im_end|>), so the model could never learn to stop"
        )
    if loss_end <= n_p:  # pragma: no cover - content is never empty after validation
        raise DataError(f"{rec.where()}: the example has no tokens carrying loss")
    return Rendered(f_ids if isinstance(f_ids, list) else list(f_ids), n_p, loss_end)


@dataclass
class PolicyResult:
    example: Optional[dict]  # None when dropped
    status: str  # ok | truncated | dropped_overlong | dropped_prompt_too_long


def apply_length_policy(r: Rendered, max_seq_len: int, overlong: str, rec: Optional[Record] = None) -> PolicyResult:
    """Cut to max_seq_len under data.overlong=drop|truncate|error; build the labels.

    Tokens the template writes after the end-of-turn token carry no loss and are cut silently when they alone
    exceed the limit. truncate keeps the whole prompt and cuts the response from the right, end-of-turn token
    included (the response did not end, so the model must not learn to stop there). A prompt that leaves no
    room for a single response token is dropped (or an error), whatever the policy.
    """
    where = rec.where() if rec is not None else "example"
    n = len(r.ids)
    if r.loss_end <= max_seq_len:
        end = min(n, max_seq_len)
        labels = [IGNORE_INDEX] * r.prompt_len + r.ids[r.prompt_len : r.loss_end] + [IGNORE_INDEX] * (end - r.loss_end)
        return PolicyResult({"input_ids": r.ids if end == n else r.ids[:end], "labels": labels}, "ok")
    if r.prompt_len >= max_seq_len:
        if overlong == "error":
            raise DataError(
                f"{where}: the prompt alone is {r.prompt_len} tokens, over data.max_seq_len={max_seq_len}; "
                "raise max_seq_len, or set data.overlong=drop"
            )
        return PolicyResult(None, "dropped_prompt_too_long")
    if overlong == "error":
        raise DataError(
            f"{where}: {r.loss_end} tokens (prompt {r.prompt_len}) exceed data.max_seq_len={max_seq_len}; raise "
            "max_seq_len, or set data.overlong=drop|truncate"
        )
    if overlong == "drop":
        return PolicyResult(None, "dropped_overlong")
    if overlong != "truncate":
        raise DataError(f"data.overlong={overlong!r} is not one of ['drop', 'truncate', 'error']")
    ids = r.ids[:max_seq_len]
    labels = [IGNORE_INDEX] * r.prompt_len + ids[r.prompt_len :]
    return PolicyResult({"input_ids": ids, "labels": labels}, "truncated")


def render_example(tokenizer: Any, record: Record, data_cfg: Any) -> Optional[dict]:
    """One record -> {"input_ids", "labels"} under data_cfg's template, system prompt and length policy.

    Returns None when data.overlong=drop drops it; raises DataError (naming file and record) on a template
    that cannot be masked, or when data.overlong=error and it is too long.
    """
    rendered = render_records(tokenizer, [record], data_cfg.response_template, data_cfg.system_prompt)[0]
    return apply_length_policy(rendered, data_cfg.max_seq_len, data_cfg.overlong, record).example


def end_of_turn_ids(tokenizer: Any, system_prompt: Optional[str] = None) -> list[int]:
    """The token id(s) that close an assistant turn in training (e.g. [<|eot_id|>] or [<|im_end|>]).

    Pass them (with eos_token_id) as stop tokens to `generate`: the model is trained to emit them.
    """
    rec = Record("q", "r", "a", None, 0, None, "<end_of_turn probe>")  # any content: the closing token is the same
    r = render_records(tokenizer, [rec], DEFAULT_RESPONSE_TEMPLATE, system_prompt)[0]
    return [r.ids[r.loss_end - 1]]
