"""Record formats: one adapter per format turns a raw record (a dict) into a validated `Record`, or into the list
of problems that name its fields.

  medsft    the seed's reasoning records: question, reasoning and answer under the keys of `data.fields`
            (default Pregunta / Razonamiento_Complejo / Respuesta, optional Archivo_fuente)
  huatuo    HuatuoGPT-o1's English reasoning records: Question / Complex_CoT / Response
  messages  {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]} (OpenAI style;
            the list may also be under "conversations"); multi-turn, optional leading system turn; an assistant
            turn may keep its reasoning apart in "reasoning_content" (or "reasoning")
  sharegpt  {"conversations": [{"from": "system" | "human" | "gpt", "value": "..."}, ...]} ("user" and
            "assistant" are accepted for "human" and "gpt"); optional top-level "system"
  alpaca    {"instruction", "input" (optional), "output", "system" (optional), "history" (optional
            [[instruction, output], ...] earlier turns)}; the prompt is the instruction, then a blank line and
            the input when there is one

The response layout (data.response_template: `## Thinking` / `## Final Response`) is applied where a record has
a reasoning and an answer (medsft, huatuo, and assistant turns with reasoning_content); turns that carry only
their own text are trained as written. `auto` detects the format from the keys of the source's first record.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional

from medsft.data.base import Record, Turn, text_problem, type_name
from medsft.errors import DataError

RECORD_FORMATS = ("auto", "medsft", "huatuo", "messages", "sharegpt", "alpaca")
FILE_TYPE_VALUES = ("json", "jsonl", "parquet", "arrow")  # what data.format meant before it named record formats
HUATUO_FIELDS = {"question": "Question", "reasoning": "Complex_CoT", "response": "Response", "source": None}
_PLACEHOLDER = re.compile(r"\{reasoning\}|\{response\}")


def check_format_name(fmt: str, key: str = "data.format") -> str:
    """`fmt` if it names a record format; a DataError that points old file-type values at data.file_type."""
    if fmt in RECORD_FORMATS:
        return fmt
    if fmt in FILE_TYPE_VALUES:
        file_key = key.rsplit(".", 1)[0] + ".file_type"
        raise DataError(f"{key}={fmt!r} is a file type: {key} now names the record format ({' | '.join(RECORD_FORMATS)})"
                        f" and the file type moved to {file_key}; use {file_key}={fmt}")
    raise DataError(f"{key}={fmt!r} is not one of {list(RECORD_FORMATS)}")


def layout_headers(template: str) -> tuple[str, ...]:
    """The layout's own text between its placeholders, line by line (`## Thinking`, `## Final Response`)."""
    out = []
    for segment in _PLACEHOLDER.split(template):
        for line in segment.splitlines():
            line = line.strip()
            if len(line) >= 3 and line not in out:
                out.append(line)
    return tuple(out)


@dataclass(frozen=True)
class FormatOptions:
    """What the adapters read from the config: the medsft field map and the layout's headers."""

    question: str
    reasoning: str
    response: str
    source: Optional[str]
    headers: tuple[str, ...] = ()

    @classmethod
    def of(cls, fields: Any, response_template: Optional[str] = None, key: str = "data.fields") -> "FormatOptions":
        def get(name: str) -> Any:
            return fields.get(name) if hasattr(fields, "get") else getattr(fields, name, None)

        names = [get(n) for n in ("question", "reasoning", "response")]
        for n, v in zip(("question", "reasoning", "response"), names):
            if not v or not isinstance(v, str):
                raise DataError(f"{key}.{n}={v!r} must name a record key")
        return cls(names[0], names[1], names[2], get("source") or None,
                   layout_headers(response_template) if response_template else ())


@dataclass
class Normalized:
    record: Optional[Record]  # None when invalid
    problems: list[str]
    missing_question: bool = False  # (reasoning formats) the question key is absent: maybe another schema
    clash: Optional[str] = None  # the text holds the layout's own headers: "'X' contains '## Final Response'"


class Adapter:
    name = ""
    reasoning = False  # the response layout is applied to every record

    def __init__(self, opts: FormatOptions):
        self.opts = opts

    def known(self) -> set:
        raise NotImplementedError

    def normalize(self, value: Any, index: int, line: Optional[int], path: str, bad_bytes: bool) -> Normalized:
        raise NotImplementedError

    def describe(self) -> str:
        return self.name

    def primary(self) -> str:
        """The key every record of the format has (for "no record has ..." messages)."""
        raise NotImplementedError

    def _clash(self, pairs: list[tuple[str, Optional[str]]]) -> Optional[str]:
        for name, text in pairs:
            if not text:
                continue
            for header in self.opts.headers:
                if header in text:
                    return f"{name!r} contains {header!r}"
        return None


class ReasoningAdapter(Adapter):
    """medsft (data.fields) and huatuo (HuatuoGPT-o1's keys): question, reasoning, answer, optional source."""

    reasoning = True

    def __init__(self, opts: FormatOptions, name: str = "medsft"):
        super().__init__(opts)
        self.name = name
        if name == "huatuo":
            f = HUATUO_FIELDS
            self.keys = (f["question"], f["reasoning"], f["response"], f["source"])
        else:
            self.keys = (opts.question, opts.reasoning, opts.response, opts.source)

    def known(self) -> set:
        fq, fr, fa, fs = self.keys
        return {fq, fr, fa} | ({fs} if fs else set())

    def primary(self) -> str:
        return f"the question field {self.keys[0]!r}"

    def describe(self) -> str:
        fq, fr, fa, _ = self.keys
        return f"{self.name} ({fq!r}, {fr!r}, {fa!r})"

    def normalize(self, value, index, line, path, bad_bytes) -> Normalized:
        fq, fr, fa, fs = self.keys
        if not isinstance(value, dict):
            return Normalized(None, [f"is {type_name(value)}, expected an object with {fq!r}, {fr!r}, {fa!r}"])
        errs: list[str] = []
        missing = [name for name in (fq, fr, fa) if name not in value]
        if missing:
            errs.append("missing " + ", ".join(repr(m) for m in missing))
        texts = []
        for name in (fq, fr, fa):
            if name in missing:
                continue
            text, problem = text_problem(name, value[name], bad_bytes)
            if problem:
                errs.append(problem)
            texts.append(text)
        source = None
        if fs and value.get(fs) is not None:
            sv = value[fs]
            if isinstance(sv, str):
                source = sv.strip() or None
            else:
                errs.append(f"{fs!r} is {type_name(sv)}, expected a string or null")
        if errs:
            return Normalized(None, errs, missing_question=fq in missing)
        rec = Record(texts[0], texts[1], texts[2], source, index, line, path)
        return Normalized(rec, [], clash=self._clash([(fr, rec.reasoning), (fa, rec.response)]))


class _ConversationAdapter(Adapter):
    list_keys: tuple[str, ...] = ()
    role_key = content_key = ""
    roles: dict[str, str] = {}

    def known(self) -> set:
        return set(self.list_keys) | {"system"}

    def primary(self) -> str:
        return f"the key {self.list_keys[0]!r}"

    def describe(self) -> str:
        return f"{self.name} ({self.list_keys[0]!r}: [{{{self.role_key!r}, {self.content_key!r}}}, ...])"

    def normalize(self, value, index, line, path, bad_bytes) -> Normalized:
        if not isinstance(value, dict):
            return Normalized(None, [f"is {type_name(value)}, expected an object with {self.list_keys[0]!r}"])
        key = next((k for k in self.list_keys if k in value), None)
        if key is None:
            return Normalized(None, [f"missing {self.list_keys[0]!r} (a list of "
                                     f"{{{self.role_key!r}, {self.content_key!r}}} turns)"], missing_question=True)
        turns_in = value[key]
        if not isinstance(turns_in, list):
            return Normalized(None, [f"{key!r} is {type_name(turns_in)}, expected a list of turns"])
        if not turns_in:
            return Normalized(None, [f"{key!r} is empty"])
        errs: list[str] = []
        system: Optional[str] = None
        if value.get("system") is not None:
            system, problem = text_problem("system", value["system"], bad_bytes)
            if problem:
                errs.append(problem)
        turns: list[Turn] = []
        for j, t in enumerate(turns_in):
            where = f"{key}[{j}]"
            if not isinstance(t, dict):
                errs.append(f"{where} is {type_name(t)}, expected an object with {self.role_key!r} and "
                            f"{self.content_key!r}")
                continue
            raw_role = t.get(self.role_key)
            role = self.roles.get(raw_role) if isinstance(raw_role, str) else None
            if role is None:
                shown = "missing" if raw_role is None else repr(raw_role)
                errs.append(f"{where}.{self.role_key} is {shown}, expected one of {sorted(set(self.roles))}")
                continue
            if self.content_key not in t:
                errs.append(f"{where} has no {self.content_key!r}")
                continue
            content, problem = text_problem(f"{where}.{self.content_key}", t[self.content_key], bad_bytes)
            if problem:
                errs.append(problem)
                continue
            if role == "system":
                if j != 0:
                    errs.append(f"{where} is a system turn after the first turn (only the first turn may be system)")
                elif system is not None:
                    errs.append(f"{where} is a system turn, and the record has a 'system' key too")
                else:
                    system = content
                continue
            reasoning = None
            if role == "assistant":
                for rk in ("reasoning_content", "reasoning"):
                    if t.get(rk) is not None:
                        text, problem = text_problem(f"{where}.{rk}", t[rk], bad_bytes)
                        if problem and "is empty" not in problem:
                            errs.append(problem)
                        reasoning = text
                        break
            turns.append(Turn(role, content, reasoning))
        if not errs:
            errs.extend(_turn_order(turns, key))
        if errs:
            return Normalized(None, errs)
        question = next(t.content for t in turns if t.role == "user")
        last = turns[-1]
        rec = Record(question, "", last.content, None, index, line, path, system, tuple(turns))
        clash = self._clash([(f"{key} reasoning", t.reasoning) for t in turns if t.reasoning]
                            + [(f"{key} answer", t.content) for t in turns if t.reasoning])
        return Normalized(rec, [], clash=clash)


def _turn_order(turns: list[Turn], key: str) -> list[str]:
    if not turns:
        return [f"{key!r} holds only a system turn"]
    expected = "user"
    for j, t in enumerate(turns):
        if t.role != expected:
            what = "the first turn after the system prompt" if j == 0 else f"turn {j} (after a {turns[j - 1].role} turn)"
            return [f"{what} is {t.role}: turns must alternate user / assistant, starting with user"]
        expected = "assistant" if expected == "user" else "user"
    if turns[-1].role != "assistant":
        return [f"the conversation ends with a user turn: nothing to learn after it (end {key!r} with an assistant "
                "turn)"]
    return []


class MessagesAdapter(_ConversationAdapter):
    name = "messages"
    list_keys = ("messages", "conversations")
    role_key, content_key = "role", "content"
    roles = {"system": "system", "user": "user", "assistant": "assistant"}


class ShareGPTAdapter(_ConversationAdapter):
    name = "sharegpt"
    list_keys = ("conversations", "messages")
    role_key, content_key = "from", "value"
    roles = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class AlpacaAdapter(Adapter):
    name = "alpaca"

    def known(self) -> set:
        return {"instruction", "input", "output", "system", "history"}

    def primary(self) -> str:
        return "the key 'instruction'"

    def describe(self) -> str:
        return "alpaca ('instruction', 'input', 'output')"

    def normalize(self, value, index, line, path, bad_bytes) -> Normalized:
        if not isinstance(value, dict):
            return Normalized(None, [f"is {type_name(value)}, expected an object with 'instruction' and 'output'"])
        errs: list[str] = []
        missing = [k for k in ("instruction", "output") if k not in value]
        if missing:
            return Normalized(None, ["missing " + ", ".join(repr(m) for m in missing)],
                              missing_question="instruction" in missing)
        instruction, p1 = text_problem("instruction", value["instruction"], bad_bytes)
        output, p2 = text_problem("output", value["output"], bad_bytes)
        errs += [p for p in (p1, p2) if p]
        extra_input = ""
        if value.get("input") is not None:
            if not isinstance(value["input"], str):
                errs.append(f"'input' is {type_name(value['input'])}, expected a string")
            else:
                text, problem = text_problem("input", value["input"], bad_bytes)
                if problem and "is empty" not in problem:
                    errs.append(problem)
                extra_input = text or ""
        system = None
        if value.get("system") is not None:
            system, problem = text_problem("system", value["system"], bad_bytes)
            if problem and "is empty" not in problem:
                errs.append(problem)
        turns: list[Turn] = []
        history = value.get("history")
        if history is not None:
            if not isinstance(history, list):
                errs.append(f"'history' is {type_name(history)}, expected a list of [instruction, output] pairs")
            else:
                for j, pair in enumerate(history):
                    if not (isinstance(pair, list) and len(pair) == 2):
                        errs.append(f"history[{j}] is {type_name(pair)}, expected [instruction, output]")
                        continue
                    q, pq = text_problem(f"history[{j}][0]", pair[0], bad_bytes)
                    a, pa = text_problem(f"history[{j}][1]", pair[1], bad_bytes)
                    errs += [p for p in (pq, pa) if p]
                    if q and a:
                        turns += [Turn("user", q), Turn("assistant", a)]
        if errs:
            return Normalized(None, errs)
        prompt = f"{instruction}\n\n{extra_input}" if extra_input else instruction
        turns += [Turn("user", prompt), Turn("assistant", output)]
        return Normalized(Record(prompt, "", output, None, index, line, path, system, tuple(turns)), [])


def adapter_for(fmt: str, opts: FormatOptions) -> Adapter:
    if fmt in ("medsft", "huatuo"):
        return ReasoningAdapter(opts, fmt)
    return {"messages": MessagesAdapter, "sharegpt": ShareGPTAdapter, "alpaca": AlpacaAdapter}[fmt](opts)


def detect_format(value: Any, opts: FormatOptions) -> Optional[str]:
    """The record format the keys of `value` identify, or None (then the medsft field map applies)."""
    if not isinstance(value, dict):
        return None
    if opts.question in value:
        return "medsft"
    for key in ("messages", "conversations"):
        turns = value.get(key)
        if isinstance(turns, list) and turns and isinstance(turns[0], dict):
            return "sharegpt" if ("from" in turns[0] or "value" in turns[0]) else "messages"
    if "instruction" in value and "output" in value:
        return "alpaca"
    if all(HUATUO_FIELDS[k] in value for k in ("question", "reasoning", "response")):
        return "huatuo"
    return None
