"""Records -> chat-formatted token ids with loss labels, through the tokenizer's own chat template.

One conversation per record: [system?] + user(question) + assistant(response layout) for reasoning records, or
the record's own turns (medsft.data.formats). The prompt of each assistant turn is the conversation before it,
rendered with add_generation_prompt=True: exactly what evaluation and generation feed the model (`prompt_ids`),
so training and inference can never disagree on the template. A multi-turn conversation is checked at every
assistant turn (each turn's prompt a prefix of the conversation, as text and as token ids), and every assistant
turn carries loss (data.loss_turns=all) or only the last one (last).

Labels (what carries loss), checked for every example:
  * every prompt token: -100. The prompt's ids must be an exact prefix of the full conversation's ids, or the
    template is rejected (the classic TRL "response key not found" / empty-mask bug);
  * the assistant content (the HuatuoGPT-o1 layout) and the end-of-turn token the template closes the turn
    with (`<|eot_id|>`, `<|im_end|>`): their ids, so the model learns to stop;
  * anything the template writes after the end-of-turn token (ChatML's trailing "\n"): -100.
The end-of-turn token is located as the first special token after the content (by character offsets of the
fast tokenizer); a template that closes the assistant turn without one is rejected.

Speed: the chat template renders text (`apply_chat_template(tokenize=False)`, batched), then the full texts are
tokenized in one batched call of the Rust tokenizer. That is the very call `apply_chat_template(tokenize=True)`
makes (`tokenizer(text, add_special_tokens=False)`, which hands the texts to the same Rust tokenizer), so ids
are identical (tests compare both paths, and every batch checks its first text); token positions are looked up
in the Rust encodings instead of converting every token's offsets to Python. The prompts' ids are read off the
full ids where provably equal (see `_derive_prompt_ids`), else tokenized on their own; either way they are
checked against the full ids.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from tokenizers import AddedToken

from medsft.data.base import Record
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
    the assistant content plus its end-of-turn token, ids[loss_end:] what the template writes after it.

    A multi-turn conversation has one loss span per assistant turn (`spans`: [start, end) each, the turn's
    content and its end-of-turn token); prompt_len is then where the first starts and loss_end where the last
    ends."""

    ids: list[int]
    prompt_len: int
    loss_end: int
    spans: Optional[list[tuple[int, int]]] = None

    def loss_spans(self) -> list[tuple[int, int]]:
        return self.spans if self.spans is not None else [(self.prompt_len, self.loss_end)]


def _special_ids(tokenizer: Any) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    ids.update(i for i, tok in decoder.items() if getattr(tok, "special", False))
    return ids


def conversation(rec: Record, response_template: str, system_prompt: Optional[str]) -> list[dict]:
    """The messages a record renders as: [system?] + its turns; assistant turns with a reasoning (and reasoning
    records' one answer) in the response layout. A record's own system prompt wins over data.system_prompt."""
    if rec.turns is None:
        return build_messages(rec.question, system_prompt) + [
            {"role": "assistant", "content": format_response(response_template, rec.reasoning, rec.response)}]
    system = rec.system if rec.system else system_prompt
    messages = [{"role": "system", "content": system}] if system else []
    for t in rec.turns:
        content = t.content
        if t.role == "assistant" and t.reasoning:
            content = format_response(response_template, t.reasoning, t.content)
        messages.append({"role": t.role, "content": content})
    return messages


class _Tokens:
    """One text's token ids and the character span of each token: read from a fast tokenizer's Encoding one
    token at a time (the spans of a whole batch are never turned into Python tuples), or from offset lists.
    Token starts never decrease, so `first_from` is a bisection."""

    __slots__ = ("ids", "_enc", "_offsets")

    def __init__(self, ids: list[int], enc: Any = None, offsets: Optional[list] = None):
        self.ids, self._enc, self._offsets = ids, enc, offsets

    def span(self, t: int) -> tuple[int, int]:
        if self._offsets is None:
            span = self._enc.token_to_chars(t)
            if span is not None:
                return span
            self._offsets = self._enc.offsets  # a token without a span of its own: use the full list
        return self._offsets[t]

    def first_from(self, char: int, lo: int = 0) -> int:
        """The first token (at or after `lo`) that starts at or after `char`."""
        hi = len(self.ids)
        while lo < hi:
            mid = (lo + hi) // 2
            if self.span(mid)[0] < char:
                lo = mid + 1
            else:
                hi = mid
        return lo


def _backend(tokenizer: Any) -> Any:
    """The Rust tokenizer to call directly, when calling it is exactly what `tokenizer(text)` does (a fast
    tokenizer with no truncation or padding configured in its tokenizer.json), else None."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.truncation is not None or backend.padding is not None:
        return None
    return backend


def _encode(tokenizer: Any, texts: list[str]) -> list[_Tokens]:
    """Token ids (and where each token is) of each text, as `tokenizer(text, add_special_tokens=False)` gives."""
    backend = _backend(tokenizer)
    if backend is not None:
        encodings = backend.encode_batch(texts, add_special_tokens=False)
        out = [_Tokens(e.ids, e) for e in encodings]
        if out:  # the premise, checked on the batch's first text: the same ids as through transformers
            ref = tokenizer(texts[0], add_special_tokens=False)["input_ids"]
            if list(ref) == out[0].ids:
                return out
            log.debug("the backend tokenizer of %s gives other ids; using the wrapper",
                      getattr(tokenizer, "name_or_path", "?"))
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, return_attention_mask=False,
                    return_token_type_ids=False)
    return [_Tokens(list(ids), offsets=offs) for ids, offs in zip(enc["input_ids"], enc["offset_mapping"])]


def _ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    backend = _backend(tokenizer)
    if backend is not None:
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    return [list(x) for x in tokenizer(texts, add_special_tokens=False, return_attention_mask=False,
                                       return_token_type_ids=False)["input_ids"]]


def render_records(
    tokenizer: Any,
    records: Sequence[Record],
    response_template: str,
    system_prompt: Optional[str],
    exact_prompts: bool = False,
) -> list[Rendered]:
    """Render and tokenize a batch of records (batched tokenizer calls); DataError names the record.

    Every assistant turn is a boundary: the conversation before it, rendered with add_generation_prompt=True,
    must be a prefix of the whole conversation (as text and as token ids), and the turn's content plus the
    end-of-turn token after it carry loss. No length policy here (see `apply_length_policy`), so the result can
    be cached independently of it. exact_prompts=True tokenizes every prompt on its own instead of deriving its
    ids (see `_derive_prompt_ids`).
    """
    if not records:
        return []
    ensure_chat_template(tokenizer)
    convs = [conversation(r, response_template, system_prompt) for r in records]
    bounds = [[j for j, m in enumerate(c) if m["role"] == "assistant"] for c in convs]
    owner = [i for i, js in enumerate(bounds) for _ in js]  # record of each prefix
    prefixes = [convs[i][:j] for i, js in enumerate(bounds) for j in js]
    contents = [convs[i][j]["content"] for i, js in enumerate(bounds) for j in js]
    prompt_texts = _render_texts(tokenizer, prefixes, True)
    full_texts = _render_texts(tokenizer, convs, False)
    full = _encode(tokenizer, full_texts)
    special = _special_ids(tokenizer)
    if exact_prompts:
        p_ids: list = [None] * len(prefixes)
    else:
        p_ids = _derive_prompt_ids(tokenizer, prompt_texts, [full_texts[i] for i in owner], [full[i] for i in owner],
                                   special)
    todo = [k for k, x in enumerate(p_ids) if x is None]
    if todo:
        for k, ids in zip(todo, _ids(tokenizer, [prompt_texts[k] for k in todo])):
            p_ids[k] = ids
    out = []
    k = 0
    for i, rec in enumerate(records):
        n = len(bounds[i])
        spans = []
        for t in range(n):
            turn = f" (assistant turn {t + 1} of {n})" if n > 1 else ""
            spans.append(_span_for(rec, turn, prompt_texts[k], full_texts[i], contents[k], p_ids[k], full[i],
                                   special, tokenizer))
            k += 1
        for t in range(1, n):
            if spans[t][0] < spans[t - 1][1]:  # pragma: no cover - the prefix checks make this impossible
                raise DataError(f"{rec.where()}: assistant turns {t} and {t + 1} overlap in the rendered conversation")
        out.append(Rendered(full[i].ids, spans[0][0], spans[-1][1], spans if n > 1 else None))
    return out


def _derive_prompt_ids(
    tokenizer: Any,
    prompt_texts: list[str],
    full_texts: list[str],
    full: list[_Tokens],
    special: set[int],
) -> list[Optional[list[int]]]:
    """The prompt's token ids, read off the full conversation's tokens where that is provably the same; None
    where the prompt must be tokenized on its own.

    Fast tokenizers split text at added/special tokens first and tokenize the pieces between them independently.
    So the prompt's tokens up to its last special token are exactly the conversation's; only the piece after
    it (template text such as "assistant\\n" or "\\n\\n", the same for every record) is tokenized, once per
    distinct piece. The first record of each batch is also tokenized in full as a check of that premise for
    this tokenizer; if it fails, every prompt is tokenized on its own. Saves ~15-25% of tokenization.
    """
    out: list[Optional[list[int]]] = [None] * len(prompt_texts)
    pieces: dict[str, list[int]] = {}
    for i, (p_text, f_text, tokens) in enumerate(zip(prompt_texts, full_texts, full)):
        n_chars = len(p_text)
        if not f_text.startswith(p_text):
            continue
        ids = tokens.ids
        k = tokens.first_from(n_chars)  # first token starting at/after the prompt's end
        if k == 0 or tokens.span(k - 1)[1] > n_chars:
            continue  # a token straddles the boundary: the exact path reports it
        s = k - 1
        while s >= 0 and ids[s] not in special and k - s <= 64:
            s -= 1
        if s < 0 or ids[s] not in special:
            continue
        piece = p_text[tokens.span(s)[1] : n_chars]
        if piece not in pieces:
            pieces[piece] = _ids(tokenizer, [piece])[0] if piece else []
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


def _span_for(
    rec: Record,
    turn: str,
    p_text: str,
    f_text: str,
    content: str,
    p_ids: list[int],
    full: _Tokens,
    special: set[int],
    tokenizer: Any,
) -> tuple[int, int]:
    """[start, end) of the tokens that carry loss for one assistant turn: its content and end-of-turn token."""
    name = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
    where = rec.where() + turn
    if not f_text.startswith(p_text):
        raise DataError(
            f"{where}: the chat template of {name} does not render the prompt (add_generation_prompt=True) "
            "as a prefix of the full conversation, so the response cannot be located and generation would not "
            "see the training prompt; use a template whose generation prompt is a prefix (e.g. Llama-3, ChatML)"
        )
    n_p = len(p_ids)
    f_ids = full.ids
    if f_ids[:n_p] != list(p_ids):
        raise DataError(
            f"{where}: with {name}, the prompt's token ids are not a prefix of the full conversation's ids "
            "(the tokenizer merges the end of the prompt with the start of the response), so prompt and "
            "response cannot be separated; change data.response_template's start or the chat template"
        )
    start = f_text.find(content, len(p_text))
    if start < 0:
        raise DataError(
            f"{where}: the chat template of {name} changes the assistant's text (it is not found verbatim "
            "in the rendered conversation), so what is trained would differ from the data"
        )
    content_end = start + len(content)
    first = full.first_from(content_end, n_p)  # the first token at or after the content's end
    loss_end = None
    for t in range(first, min(len(f_ids), first + 8)):  # template text before the end-of-turn token carries loss
        if f_ids[t] in special:
            loss_end = t + 1
            break
    if loss_end is None:
        raise DataError(
            f"{where}: the chat template of {name} does not close the assistant turn with a special "
            "end-of-turn token (like <|eot_id|> or <|im_end|>), so the model could never learn to stop"
        )
    if loss_end <= n_p:  # pragma: no cover - content is never empty after validation
        raise DataError(f"{where}: the example has no tokens carrying loss")
    return n_p, loss_end


@dataclass
class PolicyResult:
    example: Optional[dict]  # None when dropped
    status: str  # ok | truncated | dropped_overlong | dropped_prompt_too_long


OVERLONG = ("drop", "truncate", "error")


def length_decision(prompt_len: int, loss_end: int, n: int, max_seq_len: int, overlong: str) -> tuple[str, int]:
    """(status, end) of one example under data.overlong: ok | truncated | dropped_overlong |
    dropped_prompt_too_long, or error_overlong | error_prompt_too_long (data.overlong=error), and how many of its
    tokens are kept."""
    if loss_end <= max_seq_len:
        return "ok", min(n, max_seq_len)
    if prompt_len >= max_seq_len:
        return ("error_prompt_too_long" if overlong == "error" else "dropped_prompt_too_long"), 0
    if overlong == "error":
        return "error_overlong", 0
    if overlong == "drop":
        return "dropped_overlong", 0
    if overlong != "truncate":
        raise DataError(f"data.overlong={overlong!r} is not one of {list(OVERLONG)}")
    return "truncated", max_seq_len


def length_error(status: str, where: str, prompt_len: int, loss_end: int, max_seq_len: int) -> DataError:
    if status == "error_prompt_too_long":
        return DataError(f"{where}: the prompt alone is {prompt_len} tokens, over data.max_seq_len={max_seq_len}; "
                         "raise max_seq_len, or set data.overlong=drop")
    return DataError(f"{where}: {loss_end} tokens (prompt {prompt_len}) exceed data.max_seq_len={max_seq_len}; raise "
                     "max_seq_len, or set data.overlong=drop|truncate")


def labels_for(ids: Sequence[int], spans: Sequence[tuple[int, int]], end: int) -> list[int]:
    """-100 everywhere but the loss spans (cut at `end`), where the labels are the ids."""
    labels = [IGNORE_INDEX] * end
    for s, e in spans:
        if s >= end:
            break
        e = min(e, end)
        labels[s:e] = ids[s:e]
    return labels


def apply_length_policy(r: Rendered, max_seq_len: int, overlong: str, rec: Optional[Record] = None,
                        last_only: bool = False) -> PolicyResult:
    """Cut to max_seq_len under data.overlong=drop|truncate|error; build the labels.

    Tokens the template writes after the end-of-turn token carry no loss and are cut silently when they alone
    exceed the limit. truncate keeps the whole prompt and cuts the response from the right, end-of-turn token
    included (the response did not end, so the model must not learn to stop there). A prompt that leaves no
    room for a single response token is dropped (or an error), whatever the policy. last_only: only the last
    assistant turn carries loss (data.loss_turns=last); the conversation before it is the prompt.
    """
    spans = r.loss_spans()
    if last_only:
        spans = spans[-1:]
    prompt_len, loss_end = spans[0][0], spans[-1][1]
    status, end = length_decision(prompt_len, loss_end, len(r.ids), max_seq_len, overlong)
    if status.startswith("error"):
        raise length_error(status, rec.where() if rec is not None else "example", prompt_len, loss_end, max_seq_len)
    if end == 0:
        return PolicyResult(None, status)
    ids = r.ids if end == len(r.ids) else r.ids[:end]
    return PolicyResult({"input_ids": ids, "labels": labels_for(r.ids, spans, end)}, status)


def render_example(tokenizer: Any, record: Record, data_cfg: Any) -> Optional[dict]:
    """One record -> {"input_ids", "labels"} under data_cfg's template, system prompt and length policy.

    Returns None when data.overlong=drop drops it; raises DataError (naming file and record) on a template
    that cannot be masked, or when data.overlong=error and it is too long.
    """
    rendered = render_records(tokenizer, [record], data_cfg.response_template, data_cfg.system_prompt)[0]
    return apply_length_policy(rendered, data_cfg.max_seq_len, data_cfg.overlong, record,
                               last_only=data_cfg.loss_turns == "last").example


def end_of_turn_ids(tokenizer: Any, system_prompt: Optional[str] = None) -> list[int]:
    """The token id(s) that close an assistant turn in training (e.g. [<|eot_id|>] or [<|im_end|>]).

    Pass them (with eos_token_id) as stop tokens to `generate`: the model is trained to emit them.
    """
    rec = Record("q", "r", "a", None, 0, None, "<end_of_turn probe>")  # any content: the closing token is the same
    r = render_records(tokenizer, [rec], DEFAULT_RESPONSE_TEMPLATE, system_prompt)[0]
    return [r.ids[r.loss_end - 1]]
