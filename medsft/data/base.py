"""The record types every data module shares, and the text checks they are validated with.

A `Record` is one training example in the normalised shape every record format maps to (medsft.data.formats):
an optional system prompt and the conversation's turns. Reasoning records (the seed's Spanish schema,
HuatuoGPT-o1's English one) hold a question, a reasoning and an answer, rendered as one user turn and one
assistant turn in the response layout (`## Thinking` / `## Final Response`); conversation records (`messages`,
`sharegpt`, `alpaca`) hold their turns as written.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

# How many invalid records an error message lists before "and N more".
MAX_LISTED = 10
# How many invalid-record messages a load report keeps (the count is always exact).
MAX_KEPT_MESSAGES = 10_000

# Characters that show nothing: an answer made only of these (and whitespace) is empty.
_INVISIBLE = "\u200b\u200c\u200d\u2060\ufeff\u00ad\u180e\u2061\u2062\u2063\u2064"
_VISIBLE = re.compile(rf"[^\s{_INVISIBLE}]")


@dataclass(frozen=True)
class Turn:
    """One turn of a conversation: role user | assistant, its text, and (assistant turns of a record that keeps
    its reasoning apart, e.g. `reasoning_content`) the reasoning the response layout puts before it."""

    role: str
    content: str
    reasoning: Optional[str] = None


@dataclass
class Record:
    """One validated record, fields mapped and stripped of surrounding whitespace.

    Reasoning records: `question`, `reasoning`, `response` (and `turns` None). Conversation records: `turns`
    (user/assistant, alternating, starting with user, ending with assistant) and the record's own `system`;
    `question` is then the first user turn and `response` the last assistant turn (what the generation check
    asks and shows), `reasoning` is "".
    """

    question: str
    reasoning: str
    response: str
    source: Optional[str]
    index: int  # 0-based position in its source (as in error messages: "#17")
    line: Optional[int]  # 1-based line where the record starts (JSON and JSONL); None for columnar files
    path: Optional[str] = None  # the source it came from (for messages)
    system: Optional[str] = None  # the record's own system prompt (conversation formats)
    turns: Optional[tuple[Turn, ...]] = None  # conversation formats

    def where(self) -> str:
        """`data/x.jsonl: record #17 (line 18)` for error messages."""
        line = f" (line {self.line})" if self.line is not None else ""
        prefix = f"{self.path}: " if self.path else ""
        return f"{prefix}record #{self.index}{line}"

    def key(self) -> tuple:
        """What makes two records duplicates: the same question, reasoning and response (all turns and the system
        prompt of a conversation)."""
        if self.turns is None:
            return (self.question, self.reasoning, self.response)
        return (self.system or "",) + tuple((t.role, t.content, t.reasoning or "") for t in self.turns)

    def chars(self) -> int:
        """Characters of text the record renders (its length bound before tokenizing)."""
        if self.turns is None:
            return len(self.question) + len(self.reasoning) + len(self.response)
        return len(self.system or "") + sum(len(t.content) + len(t.reasoning or "") for t in self.turns)

    def assistant_turns(self) -> int:
        return 1 if self.turns is None else sum(t.role == "assistant" for t in self.turns)


@dataclass
class LoadReport:
    path: str
    total: int = 0  # records in the source
    kept: int = 0  # valid records
    invalid: list[str] = field(default_factory=list)  # one message per invalid record (the first MAX_KEPT_MESSAGES)
    duplicates: int = 0  # records identical to an earlier one; kept
    extra_fields: dict[str, int] = field(default_factory=dict)  # unknown key -> records having it; ignored
    format: str = ""  # the file type: json | jsonl | parquet | arrow | dataset (a `datasets` folder or Hub id)
    content_hash: str = ""  # identity of the source's content (cache key)
    record_format: str = ""  # medsft | huatuo | messages | sharegpt | alpaca
    detected: bool = False  # the record format was detected (data.format=auto)
    n_invalid: int = 0  # exact count of invalid records (`invalid` may be capped)
    header_clashes: int = 0  # records whose text holds the response layout's own headers
    skipped_clashes: int = 0  # ... dropped under data.headers_in_text=skip

    def summary(self) -> str:
        kind = self.format + (f", {self.record_format}{' (detected)' if self.detected else ''}"
                              if self.record_format else "")
        parts = [f"{self.path}: {self.total} records ({kind})", f"{self.kept} kept"]
        n_invalid = max(self.n_invalid, len(self.invalid))
        if n_invalid:
            parts.append(f"{n_invalid} invalid (skipped)")
        if self.duplicates:
            parts.append(f"{self.duplicates} duplicates (kept)")
        if self.skipped_clashes:
            parts.append(f"{self.skipped_clashes} with the layout's headers in their text (skipped)")
        elif self.header_clashes:
            parts.append(f"{self.header_clashes} with the layout's headers in their text (kept)")
        if self.extra_fields:
            extras = ", ".join(f"{k!r} x{v}" for k, v in sorted(self.extra_fields.items()))
            parts.append(f"extra fields ignored: {extras}")
        return "; ".join(parts)


def type_name(value: Any) -> str:
    if value is None:
        return "null"
    names = {dict: "an object", list: "a list", bool: "a boolean", int: "a number", float: "a number", str: "a string"}
    return names.get(type(value), type(value).__name__)


def listing(messages: list[str], total: Optional[int] = None) -> str:
    shown = "; ".join(messages[:MAX_LISTED])
    more = (len(messages) if total is None else total) - min(MAX_LISTED, len(messages))
    return shown + (f"; and {more} more" if more > 0 else "")


def is_blank(text: str) -> bool:
    """True when `text` shows nothing: only whitespace and zero-width characters (U+200B, U+FEFF, ...)."""
    if text and not text[0].isspace() and text[0] not in _INVISIBLE:
        return False  # the usual case, decided by the first character
    return _VISIBLE.search(text) is None


def surrogate_at(text: str) -> int:
    """Position of the first lone surrogate in `text` (invalid Unicode: a `\\ud800` escape, or undecodable
    bytes kept as surrogates), or -1."""
    try:
        text.encode("utf-8")  # C speed; only surrogates fail to encode
    except UnicodeEncodeError as err:
        return err.start
    return -1


def text_problem(name: str, value: Any, bad_bytes: Optional[bool] = False) -> tuple[Optional[str], Optional[str]]:
    """(stripped text, None) for a usable text field, else (None, the problem naming the field).

    bad_bytes: True when the record's bytes were not all UTF-8 (kept as surrogates), False when its text may hold
    lone surrogates (a `\\ud800` escape), None when it provably holds none (the check is then skipped)."""
    if not isinstance(value, str):
        return None, f"{name!r} is {type_name(value)}, expected a string"
    at = -1 if bad_bytes is None else surrogate_at(value)
    if at >= 0:
        if bad_bytes:
            return None, f"{name!r} is not valid UTF-8"
        return None, (f"{name!r} holds a lone surrogate ({value[at].encode('unicode_escape').decode()} at character "
                      f"{at}): not valid Unicode, which no tokenizer accepts")
    text = value.strip()
    if not text or is_blank(text):
        return None, f"{name!r} is empty" + ("" if not text else " (only zero-width characters)")
    return text, None


def count_extra(counter: Counter, value: dict, known: set) -> None:
    for k in value:
        if k not in known:
            counter[k] += 1
