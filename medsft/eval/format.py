"""Format compliance: does a response follow the HuatuoGPT-o1 layout the model was trained on?

    ## Thinking

    <reasoning>

    ## Final Response

    <answer>

A response is *compliant* when each header appears exactly once, as its own line (an exact markdown header:
two `#`, one space, the words; `### Thinking` or `## Thinking process` do not count), `## Thinking` comes
first, and there is non-empty text after each header. Shared by `medsft eval` and the training demo's
before/after check (issue 11), so both report the same number.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from medsft.data.templates import FINAL_RESPONSE_HEADER, THINKING_HEADER


def _header_re(header: str) -> re.Pattern:
    # The header alone on its line; leading/trailing spaces tolerated (a tokenizer may add one).
    return re.compile(r"^[ \t]*" + re.escape(header) + r"[ \t]*$", re.MULTILINE)


_THINKING_RE = _header_re(THINKING_HEADER)
_FINAL_RE = _header_re(FINAL_RESPONSE_HEADER)


@dataclass
class FormatCheck:
    compliant: bool
    has_thinking: bool  # `## Thinking` present (at least once)
    has_final: bool  # `## Final Response` present (at least once)
    reason: str | None  # why not compliant (None when compliant)
    thinking: str  # text between the first `## Thinking` and the final header (best effort)
    final: str  # text after the last `## Final Response` ('' when absent)

    def to_dict(self) -> dict:
        return asdict(self)


def check_format(text: str) -> FormatCheck:
    """Check one response against the `## Thinking` / `## Final Response` layout (see module doc)."""
    text = text or ""
    thinks = list(_THINKING_RE.finditer(text))
    finals = list(_FINAL_RE.finditer(text))
    has_thinking, has_final = bool(thinks), bool(finals)

    final = text[finals[-1].end():].strip() if finals else ""
    if thinks:
        start = thinks[0].end()
        after = [m for m in finals if m.start() >= start]
        end = after[0].start() if after else len(text)
        thinking = text[start:end].strip()
    else:
        thinking = text[: finals[0].start()].strip() if finals else ""

    reason = None
    if not text.strip():
        reason = "empty output"
    elif not has_thinking and not has_final:
        reason = f"no {THINKING_HEADER!r} and no {FINAL_RESPONSE_HEADER!r} header"
    elif not has_thinking:
        reason = f"missing {THINKING_HEADER!r}"
    elif not has_final:
        reason = f"missing {FINAL_RESPONSE_HEADER!r}"
    elif len(thinks) > 1:
        reason = f"{THINKING_HEADER!r} appears {len(thinks)} times"
    elif len(finals) > 1:
        reason = f"{FINAL_RESPONSE_HEADER!r} appears {len(finals)} times"
    elif finals[0].start() < thinks[0].start():
        reason = f"{FINAL_RESPONSE_HEADER!r} comes before {THINKING_HEADER!r}"
    elif not thinking:
        reason = f"nothing after {THINKING_HEADER!r}"
    elif not final:
        reason = f"nothing after {FINAL_RESPONSE_HEADER!r}"
    return FormatCheck(
        compliant=reason is None,
        has_thinking=has_thinking,
        has_final=has_final,
        reason=reason,
        thinking=thinking,
        final=final,
    )


def compliance_rate(texts: list[str]) -> float:
    """Fraction of compliant responses (0.0 for an empty list)."""
    if not texts:
        return 0.0
    return sum(check_format(t).compliant for t in texts) / len(texts)
