"""Reward functions for RL: format, rule verifier, model verifier. Plain callables with TRL's reward signature.

TRL's GRPOTrainer calls each reward as `f(prompts=, completions=, completion_ids=, **columns)` where the
dataset columns arrive as lists (`reference`, `options`, `gold`, ...) and returns one float per completion.
The names TRL logs (`rewards/<name>/mean`, `.../std`) are the `__name__` of these objects: `format`, `rule`,
`model_verifier`.

* `format`: 1.0 when the response follows the HuatuoGPT-o1 layout (`## Thinking` then `## Final Response`, each
  exactly once, as its own line, both non-empty; `medsft.eval.format.check_format`, shared with evaluation),
  else 0.0.
* `rule`: the Final Response against the reference: option letter (with the options of a multiple-choice
  question, through `medsft.eval.extract.extract_answer`, Spanish and English phrasings), option text, or a
  normalised answer string (accents, case and punctuation ignored; "La respuesta es X", "The answer is X").
  HuatuoGPT-o1's scale: 0 when the layout is wrong, 0.1 when well formed but wrong, 1.0 when right.
* `model_verifier`: any AutoModelForSequenceClassification checkpoint fed HuatuoGPT-o1's verifier prompt
  (`VERIFIER_TEMPLATE`); reward 1.0 when P(True) > 0.4, else 0.1; 0 when the layout is wrong. Unlike the
  original, an input over `max_length` tokens is cut inside the *response* (its middle), so the reference
  answer and the instruction are never truncated away.
"""

from __future__ import annotations

import importlib
import json
import logging
import re
import unicodedata
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from medsft.errors import ConfigError, ModelSourceError
from medsft.eval.extract import extract_answer
from medsft.eval.format import check_format
from medsft.models import resolve_model_dir, torch_dtype

log = logging.getLogger(__name__)

OPTION_LETTERS = "ABCDEFGHIJ"

# HuatuoGPT-o1's verifier input, reproduced verbatim (spaces before the periods included) from
# FreedomIntelligence/HuatuoGPT-o1 `ppo_utils/ppo_trainer_medo1.py`, `get_reward_o1` (the stage-2 PPO reward; read
# in the fork xk-huang/HuatuoGPT-o1 @ 0cf0063, which keeps the file unchanged; RL_stage2.py loads the verifier
# with AutoModelForSequenceClassification(num_labels=2) and its own tokenizer):
#   tmp.format(response, sub_answer[i], reward_tokenizer.eos_token), where `response` is the text after
#   "## Final Response\n\n" (or 'I do not know the answer.' when the layout check fails, which scores 0 anyway),
#   tokenized with add_special_tokens=False, max_length=4000, padding=True, truncation=True (right side: a long
#   response could push the reference answer out of the input), rewards = 1.0 if softmax(logits)[:, 1] > 0.4
#   else 0.1, and 0.0 when the response lacks exactly one '## Thinking' and one '## Final Response'.
VERIFIER_TEMPLATE = """<Model Response>
{}
</Model Response>

<Reference Answer>
{}
</Reference Answer>

Your task is to evaluate the model response by comparing it to the reference answer. If the model response is correct and aligns with the reference answer, output "True" . If it is incorrect or fails to select the correct option (if options are provided), output "False" . {}"""

NO_ANSWER = "I do not know the answer."  # HuatuoGPT-o1's stand-in when no Final Response can be read
TRUNCATION_MARKER = " [...] "


def completion_text(completion: Any) -> str:
    """The text of a TRL completion: a string (standard format) or a list of messages (conversational)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion:
        last = completion[-1]
        if isinstance(last, dict):
            content = last.get("content", "")
            if isinstance(content, list):  # content blocks
                return "".join(part.get("text", "") for part in content if isinstance(part, dict))
            return content or ""
    return "" if completion is None else str(completion)


def _column(kwargs: dict, name: str, n: int) -> list:
    values = kwargs.get(name)
    if values is None:
        return [None] * n
    return list(values)


def _options_of(value: Any) -> Optional[dict[str, str]]:
    """The dataset's `options` column: a JSON object string ("" when the question is open-ended) or a dict."""
    if not value:
        return None
    if isinstance(value, str):
        value = json.loads(value)
    return {str(k): str(v) for k, v in dict(value).items()} or None


# ------------------------------------------------------------------------------------------------- format


class FormatReward:
    """1.0 for a response in the `## Thinking` / `## Final Response` layout (check_format), else 0.0."""

    def __init__(self, compliant_reward: float = 1.0, failure_reward: float = 0.0):
        self.__name__ = "format"
        self.compliant_reward = compliant_reward
        self.failure_reward = failure_reward

    def __call__(self, completions: Sequence[Any], **kwargs) -> list[float]:
        return [
            self.compliant_reward if check_format(completion_text(c)).compliant else self.failure_reward
            for c in completions
        ]


# ------------------------------------------------------------------------------------------- rule verifier

_PUNCT = re.compile(r"[^\w\s]|_", re.UNICODE)
_SPACES = re.compile(r"\s+")


def normalize_answer(text: str) -> str:
    """Lower case, no accents (á -> a, ñ -> n), punctuation as spaces, single spaces."""
    text = unicodedata.normalize("NFKD", text or "")
    text = "".join(ch for ch in text if not unicodedata.combining(ch)).casefold()
    return _SPACES.sub(" ", _PUNCT.sub(" ", text)).strip()


# Leading declarations stripped before comparing (on normalised text): "la respuesta correcta es", "the final
# answer is", "respuesta:", "diagnostico:", ...
_DECLARATION = re.compile(
    r"^(?:(?:en\s+)?(?:conclusion|resumen|summary|in summary|in conclusion)\s+)?"
    r"(?:(?:la|el|the|my|mi|our)\s+)?"
    r"(?:(?:respuesta|answer|diagnostico|diagnosis|tratamiento|treatment|resultado|result)"
    r"(?:\s+(?:correcta|final|verdadera|mas\s+probable|definitiva|correct|final|most\s+likely|right))?"
    r"(?:\s+(?:es|seria|sera|is|would\s+be|will\s+be))?\s+)"
    r"(?:(?:la|el|de|un|una|the|a|an)\s+)?"
)
# Words that, right before a mention of the reference, mean it is being ruled out ("no es X", "not X").
_NEGATIONS = {"no", "not", "ni", "nor", "sin", "without", "descarta", "descartar", "descartado", "descartada",
              "excluye", "excluir", "excluded", "exclude", "unlikely", "improbable", "nunca", "never", "except",
              "excepto", "salvo", "rather", "instead"}  # fmt: skip
_NEGATION_WINDOW = 3  # words


@dataclass(frozen=True)
class RuleMatch:
    correct: bool
    method: str  # option_letter | option_text | exact | contains | none | unparsed
    detail: str = ""


def _strip_declaration(norm: str) -> str:
    return _DECLARATION.sub("", norm, count=1).strip()


def _mentions(haystack: str, needle: str) -> bool:
    """`needle` occurs in `haystack` word-bounded at least once without a negation in the 3 words before it."""
    if not needle:
        return False
    for m in re.finditer(r"(?<!\w)" + re.escape(needle) + r"(?!\w)", haystack):
        before = haystack[: m.start()].split()[-_NEGATION_WINDOW:]
        if not any(word in _NEGATIONS for word in before):
            return True
    return False


_LETTER_REF = re.compile(r"^\s*\(?([A-J])\s*(?:[.):\-]\s*(.*))?$", re.S)


def _letter_reference(reference: str) -> tuple[Optional[str], str]:
    """'B' -> ('B', ''), 'B. Folate deficiency' / '(B) ...' -> ('B', 'Folate deficiency'); else (None, reference)."""
    m = _LETTER_REF.match(reference or "")
    if m and (m.group(2) is not None or len(reference.strip().strip("()")) == 1):
        return m.group(1), (m.group(2) or "").strip()
    return None, reference


def rule_match(
    final: str,
    reference: str,
    options: Optional[dict[str, str]] = None,
    gold: Optional[str] = None,
) -> RuleMatch:
    """Does the Final Response `final` give the reference answer? (see the module doc)

    With `options` and `gold` (a multiple-choice question): the option the response chose (letter, "opción B",
    "The answer is B", or the option's text; medsft.eval.extract) must be `gold`. With a reference that is a
    letter ("B" or "B. text") and no options: the declared letter must match, or the text part. Otherwise the
    normalised reference must equal the normalised response (after a leading "La respuesta es" / "The answer
    is"), or occur in it word-bounded and not right after a negation ("no es X", "not X").
    """
    final = final or ""
    if options and gold:
        ext = extract_answer(final, options)
        if ext.parsed:
            return RuleMatch(ext.answer == gold, "option_letter" if ext.method != "option_text" else "option_text",
                             ext.evidence)  # fmt: skip
        return RuleMatch(False, "unparsed")
    letter, text = _letter_reference(reference)
    if letter is not None:
        letters = OPTION_LETTERS[: max(OPTION_LETTERS.index(letter) + 1, 4)]
        ext = extract_answer(final, {k: "" for k in letters})
        if ext.parsed:
            return RuleMatch(ext.answer == letter, "option_letter", ext.evidence)
        if not text:
            return RuleMatch(False, "unparsed")
        reference = text
    ref = normalize_answer(reference)
    if not ref:
        return RuleMatch(False, "none", "empty reference")
    norm = normalize_answer(final)
    core = _strip_declaration(norm)
    if core == ref or norm == ref:
        return RuleMatch(True, "exact")
    if _mentions(norm, ref):
        return RuleMatch(True, "contains")
    return RuleMatch(False, "none")


class RuleVerifierReward:
    """`rule`: correct_reward / incorrect_reward for a well-formed response, format_fail_reward otherwise."""

    def __init__(self, correct_reward: float = 1.0, incorrect_reward: float = 0.1, format_fail_reward: float = 0.0):
        self.__name__ = "rule"
        self.correct_reward = correct_reward
        self.incorrect_reward = incorrect_reward
        self.format_fail_reward = format_fail_reward

    def __call__(self, completions: Sequence[Any], reference: Optional[Sequence[str]] = None, **kwargs) -> list[float]:
        n = len(completions)
        if reference is None:
            raise ConfigError("the rule verifier needs a `reference` column in the RL dataset")
        options, gold = _column(kwargs, "options", n), _column(kwargs, "gold", n)
        out = []
        for completion, ref, opts, g in zip(completions, reference, options, gold):
            fc = check_format(completion_text(completion))
            if not fc.compliant:
                out.append(self.format_fail_reward)
                continue
            match = rule_match(fc.final, ref, _options_of(opts), g or None)
            out.append(self.correct_reward if match.correct else self.incorrect_reward)
        return out


# ------------------------------------------------------------------------------------------ model verifier


def _token_ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _cut_middle(tokenizer: Any, response: str, keep: int) -> str:
    """`response` with its middle removed so that about `keep` of its tokens remain (head and tail halves)."""
    if keep <= 0:
        return TRUNCATION_MARKER.strip()
    try:
        enc = tokenizer(response, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
    except (NotImplementedError, TypeError, ValueError):  # slow tokenizers: cut decoded token slices
        ids = _token_ids(tokenizer, response)
        head, tail = keep // 2, keep - keep // 2
        if len(ids) <= keep:
            return response
        return tokenizer.decode(ids[:head]) + TRUNCATION_MARKER + (tokenizer.decode(ids[-tail:]) if tail else "")
    n = len(offsets)
    if n <= keep:
        return response
    head, tail = keep // 2, keep - keep // 2
    head_end = offsets[head - 1][1] if head else 0
    tail_start = offsets[n - tail][0] if tail else len(response)
    return response[:head_end] + TRUNCATION_MARKER + response[tail_start:]


def build_verifier_input(tokenizer: Any, response: str, reference: str, max_length: int) -> tuple[str, bool]:
    """HuatuoGPT-o1's verifier text for (response, reference), at most `max_length` tokens; (text, truncated).

    Only the response is shortened (its middle is replaced by " [...] "): the reference answer, the tags and the
    instruction always stay whole. If those alone exceed max_length the response is reduced to the marker and
    the text is left longer than max_length (the verifier sees the complete reference rather than a cut one).
    """
    eos = tokenizer.eos_token or ""
    text = VERIFIER_TEMPLATE.format(response, reference, eos)
    length = len(_token_ids(tokenizer, text))
    if length <= max_length:
        return text, False
    fixed = len(_token_ids(tokenizer, VERIFIER_TEMPLATE.format(TRUNCATION_MARKER.strip(), reference, eos)))
    keep = max_length - fixed
    for _ in range(8):  # re-tokenizing the joined text can differ by a token or two at the joins
        text = VERIFIER_TEMPLATE.format(_cut_middle(tokenizer, response, keep), reference, eos)
        length = len(_token_ids(tokenizer, text))
        if length <= max_length or keep <= 0:
            break
        keep -= length - max_length
    if length > max_length:
        log.warning("verifier input is %d tokens (> rl.verifier.max_length=%d) with the response cut away: the "
                    "reference answer and instruction alone are that long; kept whole", length, max_length)  # fmt: skip
    return text, True


class ModelVerifierReward:
    """`model_verifier`: HuatuoGPT-o1's verifier reward with any sequence-classification checkpoint.

    P(True) = softmax(logits)[true_label] (a single-logit head: sigmoid). The classifier reads the last
    non-padding token (transformers' sequence-classification convention); padding is on the right, with the
    verifier tokenizer's pad token (its eos when it has none, as TRL does).
    """
    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        threshold: float = 0.4,
        true_label: int = 1,
        max_length: int = 4000,
        correct_reward: float = 1.0,
        incorrect_reward: float = 0.1,
        format_fail_reward: float = 0.0,
        batch_size: int = 8,
    ):
        self.__name__ = "model_verifier"
        self.model = model.eval()
        self.tokenizer = tokenizer
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
        num_labels = int(getattr(model.config, "num_labels", 1))
        if num_labels > 1 and not 0 <= true_label < num_labels:
            raise ConfigError(f"rl.verifier.true_label={true_label} but the verifier has {num_labels} labels")
        self.threshold = threshold
        self.true_label = true_label
        self.max_length = max_length
        self.correct_reward = correct_reward
        self.incorrect_reward = incorrect_reward
        self.format_fail_reward = format_fail_reward
        self.batch_size = batch_size
        self.truncated = 0  # inputs shortened so far (for logs)

    @classmethod
    def from_config(cls, verifier_cfg: Any, device: torch.device | str = "cpu", trust_remote_code: bool = False):
        device = torch.device(device)
        path = resolve_model_dir(str(verifier_cfg.path))
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
            model = AutoModelForSequenceClassification.from_pretrained(
                path, dtype=torch_dtype(verifier_cfg.dtype, inference_device=device), trust_remote_code=trust_remote_code
            )
        except OSError as err:
            raise ModelSourceError(
                f"rl.verifier.path={verifier_cfg.path}: cannot load a sequence-classification checkpoint ({err}). "
                "Point it at a local directory (e.g. a downloaded FreedomIntelligence/medical_o1_verifier_3B), or "
                "use rl.rewards=[format,rule] (no verifier model)."
            ) from err
        return cls(
            model.to(device),
            tokenizer,
            threshold=verifier_cfg.threshold,
            true_label=verifier_cfg.true_label,
            max_length=verifier_cfg.max_length,
            correct_reward=verifier_cfg.correct_reward,
            incorrect_reward=verifier_cfg.incorrect_reward,
            format_fail_reward=verifier_cfg.format_fail_reward,
            batch_size=verifier_cfg.batch_size,
        )

    def inputs(self, responses: Sequence[str], references: Sequence[str]) -> list[str]:
        texts = []
        for response, reference in zip(responses, references):
            text, cut = build_verifier_input(self.tokenizer, response, reference, self.max_length)
            self.truncated += int(cut)
            texts.append(text)
        return texts

    @torch.no_grad()
    def p_true(self, responses: Sequence[str], references: Sequence[str]) -> list[float]:
        """P(True) for each (Final Response, reference) pair."""
        texts = self.inputs(responses, references)
        device = next(self.model.parameters()).device
        out: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                texts[start : start + self.batch_size], add_special_tokens=False, padding=True,
                padding_side="right", return_tensors="pt",
            ).to(device)  # fmt: skip
            logits = self.model(**batch).logits.float()
            if logits.shape[-1] == 1:
                probs = torch.sigmoid(logits[:, 0])
            else:
                probs = torch.softmax(logits, dim=-1)[:, self.true_label]
            out.extend(probs.tolist())
        return out

    def __call__(self, completions: Sequence[Any], reference: Optional[Sequence[str]] = None, **kwargs) -> list[float]:
        if reference is None:
            raise ConfigError("the model verifier needs a `reference` column in the RL dataset")
        checks = [check_format(completion_text(c)) for c in completions]
        rewards = [self.format_fail_reward] * len(completions)
        scored = [i for i, fc in enumerate(checks) if fc.compliant]
        if scored:
            probs = self.p_true([checks[i].final for i in scored], [reference[i] for i in scored])
            for i, p in zip(scored, probs):
                rewards[i] = self.correct_reward if p > self.threshold else self.incorrect_reward
            log_metric = kwargs.get("log_metric")
            if callable(log_metric):
                log_metric("verifier/p_true_mean", sum(probs) / len(probs))
        return rewards


# ---------------------------------------------------------------------------------------------- building


def load_custom_reward(spec: str) -> Callable:
    """'package.module:function' -> the callable (a TRL reward function)."""
    module_name, _, attr = spec.partition(":")
    try:
        func = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"rl.rewards: cannot import {spec!r} ({err})") from err
    if not callable(func):
        raise ConfigError(f"rl.rewards: {spec!r} is not callable")
    return func


def build_reward_functions(rl_cfg: Any, device: torch.device | str = "cpu", trust_remote_code: bool = False) -> list:
    """The reward callables named by rl.rewards, in order (weights are applied by the trainer)."""
    funcs = []
    for name in rl_cfg.rewards:
        if name == "format":
            funcs.append(FormatReward())
        elif name == "rule":
            r = rl_cfg.rule
            funcs.append(RuleVerifierReward(r.correct_reward, r.incorrect_reward, r.format_fail_reward))
        elif name == "model_verifier":
            funcs.append(ModelVerifierReward.from_config(rl_cfg.verifier, device, trust_remote_code))
        else:
            funcs.append(load_custom_reward(str(name)))
    return funcs
