"""Which language an answer is written in, Spanish or English: a simple, honest check by function words.

Function words (articles, prepositions, pronouns, conjunctions) make up a large share of any running text and
differ between the two languages, while medical terms are often shared ("diabetes", "insulina"/"insulin"), so
counting the former is enough to tell a Spanish answer from an English one. An answer with too few such words
to decide (a bare letter, a formula, a repeated token) is "unknown" and counts as neither.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Iterable

SPANISH = frozenset(
    "el la los las un una unos unas de del al y o u e en con por para que se es son está están como pero más "
    "muy su sus lo le les este esta estos estas ese esa eso no sí ya también porque cuando donde sin sobre entre "
    "hay puede pueden debe tiene tienen ser fue era".split()
)
ENGLISH = frozenset(
    "the a an of and or in on with by for to that is are was were be been this these those it its as but more "
    "very their his her not yes also because when where without about between there can could should must has "
    "have had which from at".split()
)
MIN_FUNCTION_WORDS = 5  # fewer than this: "unknown"
_WORD = re.compile(r"[a-záéíóúüñ]+")


def answer_language(text: str) -> str:
    """"es", "en" or "unknown" (fewer than MIN_FUNCTION_WORDS function words, or as many of each)."""
    words = _WORD.findall(text.lower())
    es = sum(1 for w in words if w in SPANISH and w not in ENGLISH)
    en = sum(1 for w in words if w in ENGLISH and w not in SPANISH)
    if es + en < MIN_FUNCTION_WORDS or es == en:
        return "unknown"
    return "es" if es > en else "en"


def language_counts(texts: Iterable[str]) -> Counter:
    """How many answers are in each language ("es", "en", "unknown")."""
    return Counter(answer_language(t) for t in texts)
