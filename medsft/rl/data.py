"""Verifiable questions for RL: load, validate, map fields, turn multiple-choice records into questions, split.

A record is either
  * open-ended: `{rl.data.fields.question: "...", rl.data.fields.answer: "..."}` (Spanish default
    `Pregunta_Verificable` / `Respuesta_Verdadera`; HuatuoGPT-o1's `Open-ended Verifiable Question` /
    `Ground-True Answer` with `rl/data=huatuo_en`), or
  * multiple choice: `{question, options: {A: ..} | [..], answer_idx: "B" | 2}` (or `answer` equal to one option's
    text). It becomes a verifiable question: the evaluation prompt of `medsft.eval` (question + lettered options)
    with the reference "B. <option text>", and its options and gold letter kept for the rule verifier.

Files are parsed by the SFT loader (`medsft.data.records.read_raw`: JSON / JSONL / parquet, per-record line
numbers), and every record is validated before any model work; errors name the file, the record and the field:

    data/q.json: 2 of 30 records invalid: #4 (line 20) 'Respuesta_Verdadera' is empty; #7 (line 31) 'options'
    must be a dict {A: text} or a list, got a string. Fix them, or set rl.data.on_invalid=skip to drop them.
"""

from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import dataclass, field
from typing import Any, Optional

from datasets import Dataset

from medsft.data.records import _listing, _type_name, read_raw
from medsft.data.render import build_messages, ensure_chat_template
from medsft.errors import DataError
from medsft.paths import in_project
from medsft.eval.benchmarks import PROMPT_TEMPLATES, EvalItem

log = logging.getLogger(__name__)

LETTERS = "ABCDEFGHIJ"  # the option letters medsft.eval.extract reads


@dataclass
class VerifiableQuestion:
    question: str  # the user turn shown to the model
    reference: str  # the ground-truth answer the verifiers compare with
    kind: str  # open | mcq
    options: Optional[dict[str, str]] = None  # mcq: letter -> text
    gold: Optional[str] = None  # mcq: the right letter
    index: int = 0  # 0-based position in the file
    line: Optional[int] = None
    path: Optional[str] = None

    def where(self) -> str:
        line = f" (line {self.line})" if self.line is not None else ""
        return f"{self.path + ': ' if self.path else ''}record #{self.index}{line}"

    def to_row(self, prompt: list[dict]) -> dict:
        """A row of the TRL dataset: the conversational prompt plus the columns the rewards read."""
        return {
            "prompt": prompt,
            "question": self.question,
            "reference": self.reference,
            "options": json.dumps(self.options, ensure_ascii=False) if self.options else "",
            "gold": self.gold or "",
            "kind": self.kind,
            "record": self.where(),
        }


@dataclass
class RLData:
    train: list[VerifiableQuestion]
    eval: list[VerifiableQuestion]
    path: str = ""
    total: int = 0
    invalid: list[str] = field(default_factory=list)
    kinds: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        kinds = ", ".join(f"{v} {k}" for k, v in sorted(self.kinds.items()))
        skipped = f", {len(self.invalid)} invalid skipped" if self.invalid else ""
        return f"{self.path}: {self.total} records ({kinds}{skipped}) -> {len(self.train)} train, {len(self.eval)} eval"


def _kind(value: Any) -> str:
    return "a string" if isinstance(value, str) else _type_name(value)


def _text_field(value: dict, name: str, errs: list[str]) -> Optional[str]:
    if name not in value:
        errs.append(f"missing {name!r}")
        return None
    v = value[name]
    if not isinstance(v, str):
        errs.append(f"{name!r} is {_kind(v)}, expected a string")
        return None
    if not v.strip():
        errs.append(f"{name!r} is empty")
        return None
    return v.strip()


def _options(value: Any, name: str, errs: list[str]) -> Optional[dict[str, str]]:
    if isinstance(value, dict):
        opts = {str(k).strip(): v for k, v in value.items()}
        bad_keys = [k for k in opts if not (len(k) == 1 and k in LETTERS)]
        if bad_keys:
            errs.append(f"{name!r} keys must be letters A..J, got {bad_keys}")
            return None
    elif isinstance(value, list):
        if len(value) > len(LETTERS):
            errs.append(f"{name!r} has {len(value)} options, at most {len(LETTERS)} supported")
            return None
        opts = {LETTERS[i]: v for i, v in enumerate(value)}
    else:
        errs.append(f"{name!r} must be a dict {{A: text}} or a list, got {_kind(value)}")
        return None
    if len(opts) < 2:
        errs.append(f"{name!r} has {len(opts)} option(s), need at least 2")
        return None
    bad = [k for k, v in opts.items() if not isinstance(v, (str, int, float)) or not str(v).strip()]
    if bad:
        errs.append(f"{name!r}: option(s) {bad} empty or not text")
        return None
    return {k: str(v).strip() for k, v in opts.items()}


def _gold(value: dict, answer_key: str, options: dict[str, str], errs: list[str]) -> Optional[str]:
    idx = value.get(answer_key)
    if idx is not None and str(idx).strip():
        s = str(idx).strip()
        if len(s) == 1 and s.upper() in options:
            return s.upper()
        if s.isdigit() and 1 <= int(s) <= len(options):
            return list(options)[int(s) - 1]
        errs.append(f"{answer_key!r}={idx!r} is not one of the options {list(options)}")
        return None
    text = value.get("answer")
    if isinstance(text, str) and text.strip():
        hits = [k for k, v in options.items() if v.strip() == text.strip()]
        if len(hits) == 1:
            return hits[0]
        errs.append(f"'answer'={text!r} is not exactly one option's text")
        return None
    errs.append(f"missing {answer_key!r} (the right option's letter), or 'answer' equal to one option's text")
    return None


def mcq_to_question(
    question: str, options: dict[str, str], gold: str, language: str = "es", template: Optional[str] = None
) -> tuple[str, str]:
    """A multiple-choice item as (prompt text, reference): medsft.eval's prompt (so RL trains on what evaluation
    asks) and "B. <option text>"."""
    item = EvalItem(id="", benchmark="", question=question, options=options, gold=gold, language=language)
    prompt = item.prompt(template or PROMPT_TEMPLATES.get(language, PROMPT_TEMPLATES["en"]))
    return prompt, f"{gold}. {options[gold]}"


def _record(
    value: Any, index: int, line: Optional[int], path: str, data_cfg: Any
) -> tuple[Optional[VerifiableQuestion], list[str]]:
    """One raw record -> (question, []) or (None, [problems])."""
    fields = data_cfg.fields
    fq, fa = fields.question, fields.answer
    mq, mo, ma = fields.mcq_question, fields.mcq_options, fields.mcq_answer
    kind = data_cfg.kind
    if not isinstance(value, dict):
        return None, [f"is {_kind(value)}, expected an object"]
    errs: list[str] = []
    if kind == "open" or (kind == "auto" and fq in value):
        q = _text_field(value, fq, errs)
        a = _text_field(value, fa, errs)
        if errs:
            return None, errs
        return VerifiableQuestion(q, a, "open", index=index, line=line, path=path), []
    if kind == "auto" and mo not in value:
        return None, [f"missing {fq!r} (open-ended question), and no {mo!r} for a multiple-choice question"]
    q = _text_field(value, mq, errs)
    opts = None
    if mo in value:
        opts = _options(value[mo], mo, errs)
    else:
        errs.append(f"missing {mo!r}")
    gold = _gold(value, ma, opts, errs) if opts else None
    if errs:
        return None, errs
    prompt, reference = mcq_to_question(q, opts, gold, data_cfg.language, data_cfg.mcq_prompt_template)
    return VerifiableQuestion(prompt, reference, "mcq", opts, gold, index, line, path), []


def load_questions(path: str | os.PathLike, data_cfg: Any = None) -> tuple[list[VerifiableQuestion], list[str], int]:
    """Every record of `path` validated and mapped; (questions, invalid messages, total). DataError on error."""
    path = os.fspath(path)
    on_invalid = data_cfg.on_invalid
    items, problems, _, _ = read_raw(path, data_cfg.format)
    questions, bad = [], []
    for index, (value, line) in enumerate(items):
        where = f"#{index}" + (f" (line {line})" if line is not None else "")
        if index in problems:
            bad.append(f"{where} " + ", ".join(problems[index]))
            continue
        q, errs = _record(value, index, line, path, data_cfg)
        if errs:
            bad.append(f"{where} " + ", ".join(errs))
        else:
            questions.append(q)
    if bad:
        head = f"{path}: {len(bad)} of {len(items)} records invalid: {_listing(bad)}"
        if on_invalid == "error" or not questions:
            tail = " Fix them, or set rl.data.on_invalid=skip to drop them." if questions else ""
            hint = ""
            if not questions and isinstance(items[0][0], dict):
                keys = sorted(items[0][0])[:12]
                hint = (f" (keys of record #0: {keys}; map yours with rl.data.fields.question/answer, or use "
                        f"rl/data=huatuo_en for HuatuoGPT-o1's English fields)")  # fmt: skip
            raise DataError(head + hint + "." + tail)
        log.warning("%s; skipped (rl.data.on_invalid=skip)", head)
    return questions, bad, len(items)


def split_eval(questions: list, eval_ratio: float, eval_max: int, seed: int) -> tuple[list, list]:
    """Seeded held-out split (HuatuoGPT-o1's: shuffle, eval = min(ratio x n, max)); both keep file order."""
    n_eval = min(int(len(questions) * eval_ratio), eval_max)
    if n_eval <= 0:
        return list(questions), []
    order = list(range(len(questions)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    return [q for i, q in enumerate(questions) if i not in held], [q for i, q in enumerate(questions) if i in held]


def resolve_path(path: str | os.PathLike) -> str:
    """A data path: absolute, relative to the working directory, else to the project root."""
    return str(in_project(os.path.expandvars(str(path))))


def load_rl_data(data_cfg: Any, seed: int = 42) -> RLData:
    """rl.data -> train / eval questions (seeded split unless rl.data.eval_path is set)."""
    path = resolve_path(data_cfg.path)
    questions, bad, total = load_questions(path, data_cfg)
    eval_path = data_cfg.eval_path
    if eval_path:
        train = questions
        held, _, _ = load_questions(resolve_path(eval_path), data_cfg)
    else:
        train, held = split_eval(questions, float(data_cfg.eval_ratio), int(data_cfg.eval_max), seed)
    max_samples = int(data_cfg.max_samples)
    if max_samples:
        train = train[:max_samples]
    kinds: dict[str, int] = {}
    for q in questions:
        kinds[q.kind] = kinds.get(q.kind, 0) + 1
    return RLData(train, held, path, total, bad, kinds)


def filter_long_prompts(
    questions: list[VerifiableQuestion], tokenizer: Any, system_prompt: Optional[str], max_prompt_len: int
) -> tuple[list[VerifiableQuestion], list[dict], int]:
    """(kept questions, their conversational prompts, number dropped for a prompt over max_prompt_len tokens).

    Lengths are those of `medsft.data.render.prompt_ids` (the SFT rendering), computed in batches.
    """
    ensure_chat_template(tokenizer)
    kept, prompts, dropped = [], [], 0
    for start in range(0, len(questions), 512):
        chunk = questions[start : start + 512]
        convs = [build_messages(q.question, system_prompt) for q in chunk]
        texts = tokenizer.apply_chat_template(convs, tokenize=False, add_generation_prompt=True)
        lengths = [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
        for q, conv, n in zip(chunk, convs, lengths):
            if n > max_prompt_len:
                dropped += 1
                continue
            kept.append(q)
            prompts.append(conv)
    return kept, prompts, dropped


def to_dataset(questions: list[VerifiableQuestion], prompts: list[list[dict]]):
    """A `datasets.Dataset` with the columns TRL and the rewards read (prompt, reference, options, gold, ...)."""

    rows = [q.to_row(p) for q, p in zip(questions, prompts)]
    return Dataset.from_list(rows)
