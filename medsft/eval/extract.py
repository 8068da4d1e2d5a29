"""Honest answer extraction: which option did the model actually choose?

Order (first that yields an answer wins), applied to the *region*: the text after the last
`## Final Response` header when the model wrote one, else the whole output.

1. ``pattern``: explicit declarations, English and Spanish ("The answer is B", "Answer: B",
   "Answer: I think it is B", "I choose B", "La respuesta correcta es la B", "Respuesta: C",
   "Respuesta: creo que es la C", "la opción 3 es la correcta", "elijo la B"...), and a conclusion that ends
   its sentence on a letter ("..., so C.", "Por tanto, la C."). The last declaration in the region wins (a
   model that corrects itself is scored on its final word).
2. ``leading``: the region *starts* with an option marker ("B", "B.", "B)", "(B)", "**B**", "Option B",
   "Opción 3") that stands alone (below); or its last line is only a marker.
3. ``mention``: explicit option references anywhere in the region ("option B", "opción 3", "(B)"), only when
   they all name the same option (two different ones = ambiguous, fall through).
4. ``option_text``: the region is, starts with, or contains (word-bounded) exactly one option's text. An
   option whose text is a single letter (blood group "O", roman numeral "I") is matched like a bare letter:
   case-sensitively and only when it stands alone.
5. ``thinking_pattern``: only when a `## Final Response` exists but named no option, a step-1 declaration
   in the text before it (the conclusion of the reasoning).
An echoed option list ("A. <text>\\nB. <text>..." for two or more options) is removed from the region first:
repeating the options is not choosing one. Otherwise ``unparsed``: counted and scored wrong. Never a guess
by string similarity (that is the HuatuoGPT-compat scorer's behaviour, see `compat.py`).

A bare letter followed by an ordinary word is never read as a choice, in every step and after every cue:
"I think...", "Answer: I don't know", "The answer is A deficiency of...", "Respuesta: A menudo...",
"Respuesta: E incluso...", "Answer: B is unlikely" name no option (nor does a number: "The answer is 3 mg").
A letter (or number) *stands alone* when what follows it is: the end or a newline; punctuation, i.e. one of
`. , ; : ! ? ) ]` or a spaced dash (not a period or hyphen joining a word: "B-cell", "U.S."); that option's
own text ("B Collagen", "B (Collagen)"); a justification ("because", "since", "porque", "ya que", "pues"...)
or an affirmation ("is correct", "is the answer", "es la correcta"); or when emphasis or a bracket closes
right after it ("**B** ...", "(C) ...", "B) ..."). A letter an option word names ("option B ...",
"opción 3 ...") is read by ``mention``, which skips rejected ones. Letters are matched case-sensitively (an
article "a" is never option A). Options are letters A..J (MMLU-Pro has 10). For sets whose options are
numbered in the source (HEAD-QA, CasiMedicos: ``numeric=True``), "opción 3" / "respuesta 3" / "answer is 3"
map to the third letter (C).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache

from medsft.data.templates import FINAL_RESPONSE_HEADER
from medsft.eval.format import check_format

UNPARSED = "unparsed"
METHODS = ("pattern", "leading", "mention", "option_text", "thinking_pattern", UNPARSED)

# Spanish/English words for yes/no/maybe options (PubMedQA), so "Sí." reads as "yes".
_YES_NO_ALIASES = {
    "yes": ("yes", "sí", "si"),
    "no": ("no",),
    "maybe": ("maybe", "quizás", "quizas", "quizá", "quiza", "tal vez", "posiblemente"),
}


@dataclass(frozen=True)
class Extraction:
    answer: str | None  # a letter key of `options`, or None when unparsed
    method: str  # one of METHODS
    region: str  # "final" (text after ## Final Response) | "full" | "thinking"
    evidence: str = ""  # the matched snippet (for predictions.jsonl)

    @property
    def parsed(self) -> bool:
        return self.answer is not None


# --------------------------------------------------------------------------------------------- regexes

_OPT_WORD = r"(?:option|choice|opci[oó]n|alternativa)"
_CHOICE_GAP = r"[\s*_]*"  # markdown emphasis between words and the choice


@lru_cache(maxsize=256)
def _compiled(letters: str, n_numeric: int) -> dict:
    """Regexes for one option set: `letters` like 'ABCD', numbers 1..n_numeric also accepted when > 0."""
    alts = [f"[{letters}]"]
    if n_numeric:
        alts.append(f"[1-{min(n_numeric, 9)}]")
    core = "|".join(alts)
    # The choice: optional emphasis/brackets around ONE letter (or digit), not followed by a letter/digit
    # (so "Bacteria" is not B, "10" is not 1).
    choice = (
        r"(?P<ch>(?:\*\*|__|\*)?[\(\[]?(?:\*\*)?(?P<c>" + core + r")(?:\*\*)?[\)\]]?(?:\*\*|__|\*)?)"
        r"(?![A-Za-z0-9\u00C0-\u024F])"
    )
    n_art = r"(?:n[º°o]\.?\s*)?"
    la = r"(?:la\s+|el\s+)?"
    i = "(?i:"  # scoped case-insensitive group: words are case-insensitive, the letter is not
    # A hedge inside a declaration ("Answer: I think it is C", "Respuesta: creo que es la C"); without the
    # cue, "I think it's B" is not a declaration.
    hedge_en = (i + r"(?:i\s+(?:think|believe|guess|would\s+say)\s+(?:that\s+)?"
                r"(?:(?:it|this)(?:\s+is|'s|\s+would\s+be|\s+must\s+be|\s+should\s+be)\s+)?)?" + r")")
    hedge_es = i + r"(?:(?:creo|pienso|dir[ií]a)\s+que\s+(?:(?:es|ser[ií]a)\s+)?)?" + r")"
    # (regex, what must follow the choice): ALONE = it stands alone (see the module doc); FINAL = it also ends
    # its sentence (a conclusion without an answer word: "so C."); None = the pattern itself says the letter is
    # the answer ("Option D is correct").
    patterns = [
        # English
        (i + r"\banswer(?:\s+to\s+this\s+question)?" + r")" + _CHOICE_GAP
         + i + r"(?:is|would\s+be|should\s+be|will\s+be|must\s+be)" + r")" + _CHOICE_GAP
         + i + r"(?:(?:option|choice|letter)\s*)?" + r")" + r":?" + _CHOICE_GAP + choice, ALONE),
        (i + r"\banswer" + r")" + _CHOICE_GAP + r"[:=\-–]" + _CHOICE_GAP + hedge_en
         + i + r"(?:(?:option|choice)\s*)?" + r")" + choice, ALONE),
        (i + r"\b(?:correct|right|best)\s+(?:option|choice)\s+(?:is|would\s+be)" + r")" + r":?" + _CHOICE_GAP + choice, ALONE),
        (i + r"\bi(?:\s+would|\s+will|'ll|\s+shall)?\s+(?:choose|select|pick|go\s+with)\s+(?:option\s+|choice\s+)?" + r")"
         + choice, ALONE),
        (i + r"\b(?:option|choice)\s+" + r")" + choice + i + r"\s+(?:is|would\s+be)\s+(?:the\s+)?(?:correct|right|best)" + r")",
         None),
        # Spanish
        (i + r"\brespuesta(?:\s+(?:correcta|final|adecuada|acertada|verdadera|m[aá]s\s+adecuada|m[aá]s\s+probable))?"
         r"(?:\s+a\s+(?:esta|la)\s+pregunta)?" + r")" + _CHOICE_GAP
         + i + r"(?:es|ser[ií]a|ser[aá])" + r")" + _CHOICE_GAP
         + i + la + r"(?:(?:opci[oó]n|alternativa|respuesta|letra)\s*)?" + n_art + r")" + r":?" + _CHOICE_GAP + choice, ALONE),
        (i + r"\brespuesta(?:\s+(?:correcta|final))?" + r")" + _CHOICE_GAP + r"[:=\-–]" + _CHOICE_GAP + hedge_es
         + i + la + r"(?:(?:opci[oó]n|alternativa)\s*)?" + n_art + r")" + choice, ALONE),
        (i + r"\b(?:opci[oó]n|alternativa)\s+(?:correcta|adecuada|acertada|m[aá]s\s+adecuada|m[aá]s\s+probable)"
         r"\s*(?:es|ser[ií]a|ser[aá])?" + r")" + r":?" + _CHOICE_GAP + i + la + r")" + choice, ALONE),
        (i + r"\bla\s+correcta\s+es\s+" + la + r"(?:(?:opci[oó]n|alternativa|respuesta)\s*)?" + r")" + choice, ALONE),
        (i + r"\b(?:opci[oó]n|alternativa|respuesta)\s+" + n_art + r")" + choice
         + i + r"\s+(?:es\s+)?(?:la\s+)?(?:correcta|verdadera|cierta|acertada)" + r")", None),
        (i + r"\b(?:elijo|escojo|selecciono|me\s+quedo\s+con|marcar[ií]a|marco|elegir[ií]a)\s+" + la
         + r"(?:(?:opci[oó]n|alternativa|respuesta)\s*)?" + n_art + r")" + choice, ALONE),
        # A conclusion ending its sentence on a choice: "B is unlikely, so C." / "Por tanto, la C."
        (i + r"\b(?:so|therefore|thus|hence|in\s+conclusion|por\s+(?:lo\s+)?tanto|por\s+ello|por\s+consiguiente|"
         r"as[ií]\s+que|en\s+conclusi[oó]n)\s*,?" + r")" + _CHOICE_GAP
         + i + la + r"(?:(?:option|choice|opci[oó]n|alternativa)\s+)?" + r")" + choice, FINAL),
    ]
    # Leading marker: at the very start of the region.
    leading = re.compile(
        r"\A\s*(?:#+\s*)?(?:\*\*|__)?(?:" + i + r"(?:option|choice|answer|opci[oó]n|alternativa|respuesta)" + r")"
        r"[\s:]*)?" + choice
    )
    mention = re.compile(
        r"(?:" + i + r"\b" + _OPT_WORD + r")\s+" + n_art + r"(?P<c>" + core + r")"
        + r"|" + i + r"\brespuesta)\s+" + n_art + r"(?P<c2>" + (f"[1-{min(n_numeric, 9)}]" if n_numeric else "(?!x)x") + r")"
        + r"|\((?P<c3>[" + letters + r"])\))"
        r"(?![A-Za-z0-9\u00C0-\u024F])"
    )
    return {
        "patterns": [(re.compile(p), mode) for p, mode in patterns],
        "leading": leading,
        "mention": mention,
        "bare_line": re.compile(r"\A\s*" + choice + r"[\s.:)]*\Z"),
    }


ALONE, FINAL = "alone", "final"
# Words that may follow a bare letter that is a choice: a justification or an affirmation ("B because...",
# "B is correct"); no noun phrase or sentence starts like that ("A deficiency", "A menudo", "I don't").
_JUSTIFIED = re.compile(
    r"(?i:because|since|porque|pues|ya\s+que|dado\s+que|puesto\s+que|debido\s+a"
    r"|(?:is|es)\s+(?:the\s+|la\s+)?(?:correct|right|best|correcta|verdadera|cierta|acertada)"
    r"|(?:is|es)\s+(?:the\s+|la\s+)?(?:(?:correct|right|best)\s+)?(?:answer|respuesta))\b"
)


def _stands_alone(text: str, start: int, end: int, option_text: str = "", mode: str = ALONE) -> bool:
    """Is the letter (or number) at text[start:end] (with its emphasis/brackets) a choice, not the first
    letter/word of a phrase ("A deficiency", "A menudo", "I don't know", "E incluso", "B is unlikely")?

    ALONE: followed by the end, a newline or punctuation (a dash or period only when not joining a word:
    "B-cell", "U.S."), by that option's own text, by a justification/affirmation ("because", "porque",
    "is correct"); or closed by emphasis/bracket ("**B**", "(C)", "B)"). ("option B is wrong" is left to
    the mention step, which skips rejected options.) FINAL: only followed by the end of its sentence (the
    end, a newline, "." or "!") or an affirmation.
    """
    rest = text[end:]
    nxt = rest.lstrip(" \t")
    if rest[:1] in (".", "-") and rest[1:2].isalnum():
        return False  # "B-cell", "U.S.", "A.M."
    if not nxt or nxt[0] in "\r\n":
        return True
    if mode == FINAL:
        return nxt[0] in ".!" or bool(_JUSTIFIED.match(nxt))
    if nxt[0] in ".,;:!?)]…-–—":
        return True
    if text[start:end].endswith((")", "]", "*", "_")):
        return True  # (C) / [C] / C) / **C** / _C_
    opt = _norm_option(str(option_text or ""))
    if opt and _norm(nxt.lstrip("(")[: len(opt) + 200]).startswith(opt[:40]):
        return True  # "B Collagen" / "B (Collagen)"
    return bool(_JUSTIFIED.match(nxt))


def _to_letter(token: str, keys: list[str], numeric: bool) -> str | None:
    if token.isdigit():
        if not numeric:
            return None
        idx = int(token) - 1
        return keys[idx] if 0 <= idx < len(keys) else None
    return token if token in keys else None


def _norm(text: str) -> str:
    text = unicodedata.normalize("NFC", text).lower()
    text = re.sub(r"[*_`#>]+", " ", text)
    return re.sub(r"\s+", " ", text).strip()


def _norm_option(text: str) -> str:
    return _norm(text).strip(" .;:,")


def _find_word(haystack: str, needle: str) -> int:
    """Index of `needle` in `haystack` at word boundaries, or -1."""
    if not needle:
        return -1
    m = re.search(r"(?<![\w])" + re.escape(needle) + r"(?![\w])", haystack)
    return m.start() if m else -1


def _letter_texts(region: str, letter_texts: dict[str, str]) -> dict[str, int]:
    """{key: position of the first stand-alone occurrence} for options whose text is one letter ("A", "O",
    "I"): matched case-sensitively, like a bare letter ("A menudo", "O bien", "I don't" are words, not texts)."""
    found = {}
    for key, letter in letter_texts.items():
        for m in re.finditer(r"(?<![\w])[*_(\[]*" + re.escape(letter) + r"(?:\*\*|__|[*_)\]])*(?![\w])", region):
            if _stands_alone(region, m.start(), m.end(), letter):
                found[key] = m.start()
                break
    return found


def _option_text_match(region: str, options: dict[str, str]) -> tuple[str | None, str]:
    norm_region = _norm(region).strip(" .;:,!")
    if not norm_region:
        return None, ""
    variants: dict[str, list[str]] = {}
    letter_texts: dict[str, str] = {}  # options whose whole text is one letter: never matched case-insensitively
    for key, text in options.items():
        raw = str(text).strip(" .;:,*_")
        if len(raw) == 1 and raw.isalpha():
            letter_texts[key] = raw
            continue
        base = _norm_option(str(text))
        names = [base] if base else []
        names += list(_YES_NO_ALIASES.get(base, ()))
        variants[key] = sorted(set(n for n in names if n), key=len, reverse=True)
    letter_found = _letter_texts(region, letter_texts)
    # (a) the region is exactly an option text
    for key, names in variants.items():
        if norm_region in names:
            return key, norm_region
    for key, letter in letter_texts.items():
        if region.strip(" \t\r\n.;:,!*_()[]") == letter:
            return key, letter
    # (b) the region starts with an option text (the longest such)
    best = None
    for key, names in variants.items():
        for name in names:
            if norm_region.startswith(name) and (len(norm_region) == len(name) or not norm_region[len(name)].isalnum()):
                if best is None or len(name) > len(best[1]):
                    best = (key, name)
    if best:
        return best
    lead = len(region) - len(region.lstrip(" \t\r\n*_#>"))
    for key, pos in letter_found.items():
        if pos == lead:
            return key, letter_texts[key]
    # (c) exactly one option text occurs (an option contained in another found option does not count)
    found = {}
    for key, names in variants.items():
        for name in names:
            if _find_word(norm_region, name) >= 0:
                found[key] = name
                break
    keys = [k for k, name in found.items() if not any(name != other and name in other for other in found.values())]
    keys += list(letter_found)
    if len(keys) == 1:
        return keys[0], found.get(keys[0]) or letter_texts[keys[0]]
    return None, ""


def _last_pattern(
    region: str, rx: dict, options: dict[str, str], keys: list[str], numeric: bool
) -> tuple[str | None, str]:
    best = None  # (position, letter, snippet)
    for pattern, mode in rx["patterns"]:
        for m in pattern.finditer(region):
            letter = _to_letter(m.group("c"), keys, numeric)
            if letter is None:
                continue
            if mode and not _stands_alone(region, m.start("ch"), m.end("ch"), options[letter], mode):
                continue  # "Answer: I don't know", "The answer is A deficiency of...", "Respuesta: A menudo..."
            if best is None or m.start("c") > best[0]:
                best = (m.start("c"), letter, m.group(0))
    return (best[1], best[2].strip()) if best else (None, "")


def _leading(region: str, rx: dict, options: dict[str, str], keys: list[str], numeric: bool) -> tuple[str | None, str]:
    m = rx["leading"].match(region)
    if m:
        letter = _to_letter(m.group("c"), keys, numeric)
        if letter is not None:
            nxt = region[m.end():].lstrip(" \t")
            # An ordinary word after a bare letter ("I think", "A 45-year-old", "A menudo") is not a choice.
            ok = _stands_alone(region, m.start("ch"), m.end("ch"), options[letter])
            if ok and m.group("c").isdigit() and not m.group(0).lstrip(" *_#([").lower().startswith(("op", "al", "re", "an", "ch")):
                # "1. First, ..." opens a numbered list: a bare number is a choice only when alone or
                # followed by that option's text ("3. Tres.")
                after = _norm(nxt.lstrip(".):;,-– \t"))
                opt = _norm_option(options[letter])
                ok = not after.strip(" .") or bool(opt) and after.startswith(opt[:40])
            if ok:
                return letter, m.group(0).strip()
    lines = [ln for ln in region.strip().splitlines() if ln.strip()]
    if len(lines) > 1:
        m = rx["bare_line"].match(lines[-1])
        if m:
            letter = _to_letter(m.group("c"), keys, numeric)
            if letter is not None:
                return letter, lines[-1].strip()
    return None, ""


_NEGATED_AFTER = re.compile(
    r"\s*(?:\*\*)?\s*(?i:(?:is|es|was|era|seems|parece)?\s*(?:not|no|incorrect|wrong|false|unlikely|incorrecta|falsa|err[oó]nea|descartad))"
)


def _mention(region: str, rx: dict, keys: list[str], numeric: bool) -> tuple[str | None, str]:
    letters, snippets = set(), []
    for m in rx["mention"].finditer(region):
        if _NEGATED_AFTER.match(region, m.end()):
            continue  # "option A is incorrect" names A only to reject it
        token = m.group("c") or m.group("c2") or m.group("c3")
        letter = _to_letter(token, keys, numeric)
        if letter is not None:
            letters.add(letter)
            snippets.append(m.group(0))
    if len(letters) == 1:
        return letters.pop(), snippets[-1].strip()
    return None, ""


_OPTION_LINE = re.compile(r"^[ \t>*-]*(?:\*\*)?\(?(?P<c>[A-N])(?:\*\*)?(?:[.):]|[ \t]*$)(?:\*\*)?[ \t]*(?P<rest>.*)$")


def strip_option_list(region: str, options: dict[str, str]) -> str:
    """Remove an echoed option list: a model repeating (or inventing) the options has not chosen one.

    Dropped: runs of two or more consecutive lines "A. ...", "B. ...", "C. ..." with letters in sequence
    (whatever their text), and lines "X. <start of option X's text>" when two or more different options are
    echoed that way. A single "B. Collagen" line is kept: that is an answer.
    """
    lines = region.splitlines()
    marks = []
    for line in lines:
        m = _OPTION_LINE.match(line)
        marks.append((m.group("c"), m.group("rest")) if m and m.group("c") in options else None)
    drop: set[int] = set()
    i = 0
    while i < len(lines):  # runs of consecutive letters on consecutive lines
        j = i
        while j + 1 < len(lines) and marks[j] and marks[j + 1] and ord(marks[j + 1][0]) == ord(marks[j][0]) + 1:
            j += 1
        if j > i:
            drop.update(range(i, j + 1))
        i = j + 1
    hits, letters = [], set()
    for k, mark in enumerate(marks):
        if mark is None:
            continue
        rest, opt = _norm_option(mark[1]), _norm_option(str(options[mark[0]]))
        if rest and opt and (rest.startswith(opt[:24]) or opt.startswith(rest)):
            hits.append(k)
            letters.add(mark[0])
    if len(letters) >= 2:
        drop.update(hits)
    if not drop:
        return region
    return "\n".join(line for k, line in enumerate(lines) if k not in drop)


def extract_answer(text: str, options: dict[str, str], numeric: bool = False) -> Extraction:
    """The option (a key of `options`) the response chose, and how it was found; see the module doc."""
    text = text or ""
    keys = list(options.keys())
    letters = "".join(k for k in keys if len(k) == 1 and k.isalpha() and k.isupper())
    if not letters:
        raise ValueError(f"options must be keyed by capital letters, got {keys}")
    rx = _compiled(letters, len(keys) if numeric else 0)
    fc = check_format(text)
    if fc.has_final:
        region, region_name = fc.final, "final"
    else:
        region, region_name = text, "full"

    region = strip_option_list(region, options)
    steps = (
        ("pattern", lambda r: _last_pattern(r, rx, options, keys, numeric)),
        ("leading", lambda r: _leading(r, rx, options, keys, numeric)),
        ("mention", lambda r: _mention(r, rx, keys, numeric)),
        ("option_text", lambda r: _option_text_match(r, options)),
    )
    for method, step in steps:
        letter, evidence = step(region)
        if letter is not None:
            return Extraction(letter, method, region_name, evidence)
    if fc.has_final:
        before = text[: text.rfind(FINAL_RESPONSE_HEADER)]
        letter, evidence = _last_pattern(before, rx, options, keys, numeric)
        if letter is not None:
            return Extraction(letter, "thinking_pattern", "thinking", evidence)
    return Extraction(None, UNPARSED, region_name, "")
