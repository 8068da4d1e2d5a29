"""Benchmark loaders: every set becomes a list of `EvalItem` (question, lettered options, gold letter).

* `huatuo_o1`: HuatuoGPT-o1's `eval_data.json` (benchmark name -> records `question`, `options{A:..}`,
  `answer_idx`): MedMCQA 4183, MedQA 1273, PubMedQA 1000 (options A yes / B no / C maybe), MMLU-Pro
  medical 1535 (3 to 10 options, A..J), GPQA medical 390. English.
* `headqa_es`: HEAD-QA v1.0 Spanish (`{split}_HEAD.json`). Answers are numbered (`aid` int 1..5, `ra` the
  right aid as a STRING); they are shown as letters A..E in aid order, and "opción 3" is read as C.
  Questions with an image are skipped by default (the model cannot see it), and counted.
* `casimedicos_es`: CasiMedicos-exp in SQuAD format; the right option is not a field, it is derived from
  the doctor's explanation span (see `derive_casimedicos_gold`); undeliverable items are skipped and counted.
* `huatuo_format`: any user file in the HuatuoGPT format: a JSON list of records, a JSON object
  {benchmark: [records]} (like eval_data.json) or JSONL; `question`, `options` (a dict {A: text} or a list),
  `answer_idx` (letter, or 1-based number) or `answer` (the option text).
"""

from __future__ import annotations

import json
import os
import random
import re
import unicodedata
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from medsft.errors import ConfigError, DataError
from medsft.paths import REPO_ROOT, SHARED_DATA_ENV

LETTERS = "ABCDEFGHIJKLMN"

HUATUO_O1_BENCHMARKS = (
    "MedMCQA_validation",
    "MedQA_USLME_test",
    "PubMedQA_test",
    "MMLU-Pro_Medical_test",
    "GPQA_Medical_test",
)

# Prompts. English = HuatuoGPT-o1's own (non-strict) eval prompt, so numbers stay comparable with the paper.
PROMPT_TEMPLATES = {
    "en": "Please answer the following multiple-choice question:\n{question}\n{option_str}",
    "es": "Responde a la siguiente pregunta de opción múltiple:\n{question}\n{option_str}",
}

WHERE_TO_GET = {
    "huatuo_o1": "HuatuoGPT-o1's evaluation/data/eval_data.json (github.com/FreedomIntelligence/HuatuoGPT-o1)",
    "headqa_es": "HEAD-QA v1.0 Spanish, {train,dev,test}_HEAD.json (https://aghie.github.io/head-qa/)",
    "casimedicos_es": (
        "casimedicos-exp_{dev,test}_qp_ce.json from casimedicos-exp-squad-format.tar.gz "
        "(github.com/ixa-ehu/antidote-casimedicos)"
    ),
    "huatuo_format": "your own file in the HuatuoGPT format (question, options, answer_idx)",
}


@dataclass
class EvalItem:
    id: str
    benchmark: str
    question: str  # the full question text shown to the model (case + stem for clinical cases)
    options: dict[str, str]  # letter -> text, in display order
    gold: str  # a key of options
    language: str = "en"
    numeric: bool = False  # options are numbered in the source: "opción 3" means C
    meta: dict[str, Any] = field(default_factory=dict)

    def option_str(self) -> str:
        return "\n".join(f"{k}. {v}" for k, v in self.options.items())

    def prompt(self, template: str | None = None) -> str:
        template = template or PROMPT_TEMPLATES.get(self.language, PROMPT_TEMPLATES["en"])
        return template.format(question=self.question, option_str=self.option_str())


@dataclass
class Benchmark:
    name: str
    items: list[EvalItem]
    language: str = "en"
    source: str = ""
    n_total: int = 0  # records in the file before skips and limit
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ data paths


def resolve_data_path(path: str | os.PathLike, kind: str) -> Path:
    """A config path: absolute, or relative to the working directory, else to the project root."""
    p = Path(os.path.expandvars(str(path))).expanduser()
    candidates = [p] if p.is_absolute() else [Path.cwd() / p, REPO_ROOT / p]
    for c in candidates:
        if c.exists():
            return c.resolve()
    where = WHERE_TO_GET.get(kind, "")
    raise DataError(
        f"eval data not found: {path!s} (looked in {', '.join(str(c) for c in candidates)}). "
        f"Set eval.path=<location> or {SHARED_DATA_ENV}=<the folder holding the benchmark folders>"
        f"{'; get it from ' + where if where else ''}."
    )


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            if path.suffix == ".jsonl":
                return [json.loads(line) for line in f if line.strip()]
            return json.load(f)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err})") from err


# -------------------------------------------------------------------------------------------- helpers


def _limit(items: list[EvalItem], limit: int, seed: int | None) -> list[EvalItem]:
    """At most `limit` items (0 = all): a seeded random subset kept in file order, or the first ones."""
    if not limit or limit >= len(items):
        return items
    if seed is None:
        return items[:limit]
    keep = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in keep]


def _lettered_options(options: Any, where: str) -> dict[str, str]:
    if isinstance(options, dict):
        out = OrderedDict((str(k).strip(), str(v)) for k, v in options.items())
        if not all(len(k) == 1 and k in LETTERS for k in out):
            raise DataError(f"{where}: option keys must be letters A..N, got {list(out)}")
        return dict(out)
    if isinstance(options, list):
        if len(options) > len(LETTERS):
            raise DataError(f"{where}: {len(options)} options, at most {len(LETTERS)} supported")
        return {LETTERS[i]: str(v) for i, v in enumerate(options)}
    raise DataError(f"{where}: 'options' must be a dict {{A: text}} or a list, got {type(options).__name__}")


def _gold_letter(rec: dict, options: dict[str, str], where: str) -> str:
    idx = rec.get("answer_idx")
    if idx is not None and str(idx).strip():
        s = str(idx).strip()
        if s.upper() in options and len(s) == 1:
            return s.upper()
        if s.isdigit() and 1 <= int(s) <= len(options):
            return list(options)[int(s) - 1]
        raise DataError(f"{where}: answer_idx={idx!r} is not one of the options {list(options)}")
    ans = rec.get("answer")
    if ans is not None:
        hits = [k for k, v in options.items() if v.strip() == str(ans).strip()]
        if len(hits) == 1:
            return hits[0]
    raise DataError(f"{where}: no 'answer_idx' (or 'answer' equal to one option's text)")


# -------------------------------------------------------------------------------------- HuatuoGPT format


def load_huatuo_format(
    path: str | os.PathLike,
    *,
    kind: str = "huatuo_format",
    subsets: Iterable[str] | None = None,
    language: str = "en",
    limit: int = 0,
    seed: int | None = 0,
    name: str | None = None,
    fields: dict[str, str] | None = None,
) -> list[Benchmark]:
    """HuatuoGPT-format file -> one Benchmark per top-level key (or one for a list / JSONL file)."""
    p = resolve_data_path(path, kind)
    data = _read_json(p)
    fields = fields or {}
    q_key, o_key = fields.get("question", "question"), fields.get("options", "options")
    if isinstance(data, list):
        groups = {name or p.stem: data}
    elif isinstance(data, dict) and all(isinstance(v, list) for v in data.values()):
        groups = data
    else:
        raise DataError(f"{p}: expected a JSON list of records or an object {{benchmark: [records]}}")
    wanted = list(subsets or [])
    if wanted:
        unknown = [s for s in wanted if s not in groups]
        if unknown:
            raise ConfigError(f"eval.subsets: {unknown} not in {p.name}; available: {list(groups)}")
        groups = {k: groups[k] for k in wanted}
    out = []
    for bench, records in groups.items():
        items = []
        for i, rec in enumerate(records):
            where = f"{p.name}[{bench}][{i}]"
            if not isinstance(rec, dict) or q_key not in rec or o_key not in rec:
                raise DataError(f"{where}: needs '{q_key}' and '{o_key}'")
            options = _lettered_options(rec[o_key], where)
            items.append(
                EvalItem(
                    id=str(rec.get("id", f"{bench}/{i}")),
                    benchmark=bench,
                    question=str(rec[q_key]),
                    options=options,
                    gold=_gold_letter(rec, options, where),
                    language=rec.get("language", language),
                )
            )
        out.append(
            Benchmark(bench, _limit(items, limit, seed), language=language, source=str(p), n_total=len(records))
        )
    return out


def load_huatuo_o1(path: str | os.PathLike, subsets: Iterable[str] | None = None, limit: int = 0, seed: int | None = 0) -> list[Benchmark]:
    benches = load_huatuo_format(path, kind="huatuo_o1", subsets=subsets, language="en", limit=limit, seed=seed)
    for b in benches:
        if b.name == "PubMedQA_test":
            b.notes.append("PubMedQA options: A yes / B no / C maybe (answers 'yes'/'no'/'maybe' are read too)")
    return benches


# ---------------------------------------------------------------------------------------------- HEAD-QA


def _split_file(root: Path, name: str, what: str, preset: str) -> Path:
    """The split's file inside a benchmark folder (or `root` itself when it is a file); DataError if absent."""
    f = root / name if root.is_dir() else root
    if not f.exists():
        raise DataError(f"{what}: {f} not found; get it from {WHERE_TO_GET[preset]}")
    return f


def load_headqa(
    path: str | os.PathLike,
    splits: Iterable[str] = ("test",),
    *,
    skip_images: bool = True,
    categories: Iterable[str] | None = None,
    limit: int = 0,
    seed: int | None = 0,
) -> list[Benchmark]:
    """HEAD-QA Spanish: one Benchmark per split (`headqa_es_test`...). `path` is the folder of *_HEAD.json."""
    root = resolve_data_path(path, "headqa_es")
    cats = {c.lower() for c in (categories or [])}
    out = []
    for split in splits:
        f = _split_file(root, f"{split}_HEAD.json", f"HEAD-QA split {split!r}", "headqa_es")
        data = _read_json(f)
        if not isinstance(data, dict) or "exams" not in data:
            raise DataError(f"{f}: not a HEAD-QA file (no 'exams')")
        items, skipped, total = [], Counter(), 0
        for exam_name, exam in data["exams"].items():
            for q in exam.get("data", []):
                total += 1
                where = f"{f.name}[{exam_name}][qid={q.get('qid')}]"
                if cats and str(exam.get("category", "")).lower() not in cats:
                    skipped["category filtered"] += 1
                    continue
                if skip_images and q.get("image"):
                    skipped["has image"] += 1
                    continue
                answers = sorted(q.get("answers", []), key=lambda a: int(a["aid"]))
                if not answers or len(answers) > len(LETTERS):
                    raise DataError(f"{where}: {len(answers)} answers")
                options = {LETTERS[i]: str(a["atext"]).strip() for i, a in enumerate(answers)}
                aid_to_letter = {int(a["aid"]): LETTERS[i] for i, a in enumerate(answers)}
                try:
                    gold = aid_to_letter[int(str(q["ra"]).strip())]  # `ra` is a string, `aid` an int
                except (KeyError, ValueError):
                    raise DataError(f"{where}: ra={q.get('ra')!r} is not one of the aids {list(aid_to_letter)}") from None
                items.append(
                    EvalItem(
                        id=f"{split}/{exam_name}/{q.get('qid')}",
                        benchmark=f"headqa_es_{split}",
                        question=str(q["qtext"]).strip(),
                        options=options,
                        gold=gold,
                        language="es",
                        numeric=True,
                        meta={"category": exam.get("category"), "year": exam.get("year"), "ra": str(q["ra"])},
                    )
                )
        bench = Benchmark(
            f"headqa_es_{split}", _limit(items, limit, seed), language="es", source=str(f), n_total=total,
            skipped=dict(skipped),
        )
        bench.notes.append("options numbered 1..N in the exam are shown as A..; 'opción 3' reads as C")
        out.append(bench)
    return out


# ------------------------------------------------------------------------------------------ CasiMedicos

_NEG_STEM = re.compile(r"\b(?:INCORRECTA|FALSA|EXCEPTO|NO)\b")
_NUM_REF = r"\b(?:opci[oó]n|respuesta|alternativa)\b\s*(?:n[º°o]\.?\s*)?(\d)"
# Positive statements that name the right option by its number.
_POSITIVE_REFS = [
    re.compile(_NUM_REF + r"\s*(?:es\s+)?(?:la\s+)?(?:correcta|verdadera|cierta)\b", re.I),
    re.compile(r"\b(?:respuesta|opci[oó]n)\b(?:\s+(?:correcta|final|acertada|m[aá]s\s+(?:correcta|cercana|adecuada|indicada)))?"
               r"(?:\s+a\s+esta\s+pregunta)?\s*(?:es|ser[ií]a|:)\s*(?:la\s+)?"
               r"(?:opci[oó]n\s+|respuesta\s+)?(?:n[º°o]\.?\s*)?(\d)\b", re.I),
    re.compile(r"\bla\s+m[aá]s\s+(?:correcta|adecuada|indicada|acertada)\s+es\s+la\s+(\d)\b", re.I),
    re.compile(r"\bla\s+[uú]nica\s+opci[oó]n\b[^.]{0,60}?\bes\s+la\s+(\d)\b", re.I),
    re.compile(r"(?:\(|\b)(\d)\s+(?:es\s+)?(?:la\s+)?correcta\b", re.I),  # "(1 correcta)", "4 es correcta"
    re.compile(r"\b(?:elijo|me\s+quedo\s+con)\s+la\s+(\d)\b", re.I),
    re.compile(r"\bse\s+define\s+con\s+la\s+respuesta\s+(\d)\b", re.I),
    re.compile(r"(?:^|[.:]\s+)la\s+(\d)\s*\.?\s*$", re.I),  # "... VIPoma-diarrea. La 3."
]
# For FALSA/INCORRECTA/NO questions the false option is the one to mark: "la respuesta 2 es la falsa y, por
# tanto, la que habría que marcar", "(respuesta 1 FALSA)". Read from the span only.
_MARK_REF = re.compile(_NUM_REF + r"\s*(?:es\s+)?(?:la\s+)?(?:falsa|incorrecta)\b", re.I)
# "la opción correcta es adrenarquia precoz": the option named by its text after a positive statement.
_TEXT_REF = re.compile(r"\b(?:opci[oó]n|respuesta)\s+correcta\s+(?:es|ser[ií]a)\s+(?:la\s+|el\s+)?([^.;()]{3,120})", re.I)
# The case and the explanation are joined by a double space before a capitalised sentence.
_CASE_END = re.compile(r"[ \t]{2,}(?=[A-ZÁÉÍÓÚÑ¿¡«\"(])")
_STOP = set(
    "de la el los las del en con por para que una un unos unas y o a se su sus es al lo como mas no si sin ante "
    "tras entre sobre este esta estos estas ese esa le les ya muy".split()
)


def _fold(s: str) -> str:
    s = unicodedata.normalize("NFKD", s.lower())
    s = "".join(c for c in s if not unicodedata.combining(c))
    return re.sub(r"\s+", " ", re.sub(r"[^\w%/,.\- ]", " ", s)).strip()


def _stems(s: str) -> set[str]:
    return {w[:6] for w in re.findall(r"\w+", _fold(s)) if len(w) > 3 and w not in _STOP}


def split_casimedicos_question(question: str) -> tuple[str, list[str]]:
    """'<stem>?: opt1 @@ opt2 @@ ...' -> (stem, options). The stem ends at the last '?' of the first segment,
    else at its first ': '."""
    segs = [s.strip() for s in question.split(" @@ ")]
    first = segs[0]
    if "?" in first:
        cut = first.rfind("?") + 1
        stem, opt1 = first[:cut], first[cut:].lstrip(" :")
    elif ": " in first:
        cut = first.find(": ")
        stem, opt1 = first[: cut + 1], first[cut + 2 :]
    else:
        stem, opt1 = "", first
    return stem.strip(), [opt1.strip()] + segs[1:]


def derive_casimedicos_gold(explanation_span: str, options: list[str], stem: str = "", explanation: str = "") -> tuple[int | None, str]:
    """1-based number of the right option, and how it was derived (or (None, reason)).

    The SQuAD-format CasiMedicos-exp gives, as `answers[0].text`, the span of the doctor's explanation that
    justifies the RIGHT option, but not the option itself. In order:
      1. `explicit`: the span (then the whole explanation) names it by number with a positive statement
         ("opción 3 correcta", "la respuesta correcta es la 1", "la respuesta es la 4", "(1 correcta)",
         "elijo la 3"), one number only (two different numbers: not derivable); for FALSA/INCORRECTA/NO
         questions also "(respuesta 1 FALSA)" in the span; or "la opción correcta es <option text>";
      2. `option_text`: exactly one option's text (accent/case-folded, final period dropped) occurs in the span;
      3. `overlap`: one option shares >= 60% (and >= 2) of its content words (6-char stems, stop words out)
         with the span and beats every other option by >= 0.3 (e.g. span "...iniciar oxigenoterapia suplementaria"
         -> "Oxígeno suplementario").
    Anything else is not derivable (the span only argues, e.g. "Eleva gonadotropina coriónica.").
    """
    n = len(options)
    negative = bool(_NEG_STEM.search(stem))
    for text in (explanation_span, explanation):
        if not text:
            continue
        nums = {int(m.group(1)) for rx in _POSITIVE_REFS for m in rx.finditer(text)}
        if negative and text is explanation_span and not nums:
            nums = {int(m.group(1)) for m in _MARK_REF.finditer(text)}
        nums = {k for k in nums if 1 <= k <= n}
        if len(nums) == 1:
            return nums.pop(), "explicit"
        if len(nums) > 1:
            return None, "conflicting option numbers in the explanation"
    for m in _TEXT_REF.finditer(explanation_span):
        named = _fold(m.group(1)).rstrip(". ")
        hits = [i for i, o in enumerate(options) if named and _fold(o).rstrip(". ").startswith(named)]
        if len(hits) == 1:
            return hits[0] + 1, "explicit"
    span = _fold(explanation_span)
    hits = []
    for i, opt in enumerate(options):
        o = _fold(opt).rstrip(". ")
        if o and re.search(r"(?<!\w)" + re.escape(o) + r"(?!\w)", span):
            hits.append(i)
    # an option contained in another matched option does not count on its own
    hits = [i for i in hits if not any(j != i and _fold(options[i]).rstrip(". ") in _fold(options[j]) for j in hits)]
    if len(hits) == 1:
        return hits[0] + 1, "option_text"
    if not hits:
        span_stems = _stems(explanation_span)
        shared = [len(_stems(o) & span_stems) for o in options]
        scores = [shared[i] / max(1, len(_stems(o))) for i, o in enumerate(options)]
        order = sorted(range(n), key=lambda i: -scores[i])
        top = order[0]
        if n > 1 and shared[top] >= 2 and scores[top] >= 0.6 and scores[top] - scores[order[1]] >= 0.3:
            return order[0] + 1, "overlap"
    return None, "not derivable from the explanation span"


_LEAK = re.compile(
    r"\b(?:respuesta|opci[oó]n|alternativa)(?:es)?\s*(?:n[º°o]\.?\s*)?\d|\b(?:in)?correcta\b|\bfalsa\b|\bopciones\b", re.I
)


def _casimedicos_case(context: str, span: str, stem: str) -> tuple[str, str]:
    """The clinical case part of `context` (case + explanation) and which boundary was used.

    1. a double space before a capital (how the set joins case and explanation), if before the span;
    2. else the end of the question stem when the context repeats it before the span;
    3. else the start of the explanation span (may keep some explanation: items whose case then
       mentions options/"correcta" are skipped as "boundary unclear").
    """
    start = context.find(span) if span else -1
    limit = start if start >= 0 else len(context)
    m = _CASE_END.search(context)
    if m and m.start() <= limit:
        return context[: m.start()].strip(), "double_space"
    if stem:
        i = context.find(stem)
        if 0 <= i and i + len(stem) <= limit:
            return context[: i + len(stem)].strip(), "stem"
    return context[:limit].strip(), "span_start"


def load_casimedicos(
    path: str | os.PathLike,
    splits: Iterable[str] = ("test",),
    *,
    limit: int = 0,
    seed: int | None = 0,
) -> list[Benchmark]:
    """CasiMedicos-exp (SQuAD format) -> one Benchmark per split (`casimedicos_es_test`...).

    The prompt is the clinical case + the question stem; see `_casimedicos_case` for where the case ends.
    Records repeating the same question
    (the set has several explanations of some MIR questions) are merged: one item, the derivations pooled.
    """
    root = resolve_data_path(path, "casimedicos_es")
    out = []
    for split in splits:
        f = _split_file(root, f"casimedicos-exp_{split}_qp_ce.json", f"CasiMedicos split {split!r}", "casimedicos_es")
        data = _read_json(f)
        try:
            paragraphs = [p for d in data["data"] for p in d["paragraphs"]]
        except (KeyError, TypeError):
            raise DataError(f"{f}: not SQuAD format (data[].paragraphs[])") from None
        groups: "OrderedDict[str, list[dict]]" = OrderedDict()
        total = 0
        for p in paragraphs:
            ctx = p["context"]
            for qa in p["qas"]:
                total += 1
                span = qa["answers"][0]["text"] if qa.get("answers") else ""
                case, boundary = _casimedicos_case(ctx, span, split_casimedicos_question(qa["question"])[0])
                groups.setdefault(qa["question"], []).append(
                    {"id": str(qa["id"]), "case": case, "boundary": boundary, "span": span,
                     "explanation": ctx[len(case):].strip() if ctx.startswith(case) else ctx}
                )
        items, skipped = [], Counter()
        derivation = Counter()
        for question, recs in groups.items():
            skipped["duplicate question (merged)"] += len(recs) - 1
            stem, options = split_casimedicos_question(question)
            found = [derive_casimedicos_gold(r["span"], options, stem, r["explanation"]) for r in recs]
            nums = {k for k, _ in found if k is not None}
            if len(nums) != 1:
                skipped["gold not derivable" if not nums else "conflicting derivations"] += 1
                continue
            gold_num = nums.pop()
            how = next(h for k, h in found if k == gold_num)
            derivation[how] += 1
            clean = [r for r in recs if not _LEAK.search(r["case"])]
            if not clean:
                skipped["case/explanation boundary unclear"] += 1
                continue
            case = clean[0]["case"]
            # The case sometimes already ends with the stem ("... requiere descartar:"); do not repeat it.
            body = case if stem and _fold(stem)[:40] in _fold(case) else f"{case}\n{stem}".strip()
            opts = {LETTERS[i]: o for i, o in enumerate(options)}
            items.append(
                EvalItem(
                    id=f"{split}/{recs[0]['id']}",
                    benchmark=f"casimedicos_es_{split}",
                    question=body,
                    options=opts,
                    gold=LETTERS[gold_num - 1],
                    language="es",
                    numeric=True,
                    meta={"derivation": how, "source_ids": [r["id"] for r in recs]},
                )
            )
        bench = Benchmark(
            f"casimedicos_es_{split}", _limit(items, limit, seed), language="es", source=str(f), n_total=total,
            skipped=dict(skipped),
        )
        bench.notes.append(
            f"gold derived from the explanation span for {sum(derivation.values())} of {len(groups)} distinct "
            f"questions ({', '.join(f'{k} {v}' for k, v in derivation.most_common())}); {len(items)} usable"
        )
        out.append(bench)
    return out


# ------------------------------------------------------------------------------------------- dispatcher

KINDS = ("huatuo_o1", "headqa_es", "casimedicos_es", "huatuo_format")


def load_benchmarks(eval_cfg: Any) -> list[Benchmark]:
    """The benchmarks an `eval` config node names (kind, path, subsets, splits, limit, ...)."""
    kind = eval_cfg.kind
    limit = int(eval_cfg.limit or 0)
    seed = eval_cfg.sample_seed
    if kind == "huatuo_o1":
        return load_huatuo_o1(eval_cfg.path, subsets=list(eval_cfg.subsets or []), limit=limit, seed=seed)
    if kind == "headqa_es":
        return load_headqa(
            eval_cfg.path, list(eval_cfg.splits or ["test"]), skip_images=eval_cfg.skip_images,
            categories=list(eval_cfg.categories or []), limit=limit, seed=seed,
        )
    if kind == "casimedicos_es":
        return load_casimedicos(eval_cfg.path, list(eval_cfg.splits or ["test"]), limit=limit, seed=seed)
    if kind == "huatuo_format":
        return load_huatuo_format(
            eval_cfg.path, subsets=list(eval_cfg.subsets or []), language=eval_cfg.language, limit=limit,
            seed=seed, name=None if eval_cfg.name in (None, "", "custom") else eval_cfg.name,  # else the file's stem
        )
    raise ConfigError(f"eval.kind={kind!r} is not one of {list(KINDS)}")
