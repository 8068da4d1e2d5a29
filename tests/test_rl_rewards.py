"""RL rewards on hand-written responses: format, rule verifier (Spanish and English), model verifier."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "rl"))

from rl_helpers import build_tiny_verifier, layout  # noqa: E402

from medsft.errors import ConfigError  # noqa: E402
from medsft.rl.rewards import (  # noqa: E402
    VERIFIER_TEMPLATE,
    FormatReward,
    ModelVerifierReward,
    RuleVerifierReward,
    build_verifier_input,
    completion_text,
    load_custom_reward,
    normalize_answer,
    rule_match,
)

GOOD_ES = layout("La fiebre y la consolidación sugieren neumonía.",
                 "La respuesta es neumonía adquirida en la comunidad.")
GOOD_EN = layout("Low ferritin and microcytosis point to iron deficiency.", "The answer is iron deficiency anemia.")


def conv(text: str) -> list[dict]:
    """A TRL conversational completion."""
    return [{"role": "assistant", "content": text}]


# ------------------------------------------------------------------------------------------------- format

MALFORMED = {
    "empty": "",
    "no headers": "La respuesta es neumonía.",
    "only thinking": "## Thinking\n\nPienso que es neumonía.",
    "only final": "## Final Response\n\nNeumonía.",
    "reversed": "## Final Response\n\nNeumonía.\n\n## Thinking\n\nPorque hay fiebre.",
    "thinking twice": "## Thinking\n\nA.\n\n## Thinking\n\nB.\n\n## Final Response\n\nC.",
    "final twice": "## Thinking\n\nA.\n\n## Final Response\n\nB.\n\n## Final Response\n\nC.",
    "empty thinking": "## Thinking\n\n## Final Response\n\nNeumonía.",
    "empty final": "## Thinking\n\nFiebre y tos.\n\n## Final Response\n\n   ",
    "wrong level": "### Thinking\n\nA.\n\n### Final Response\n\nB.",
    "inline header": "Mi ## Thinking es A y mi ## Final Response es B.",
}


def test_format_reward_accepts_the_layout_in_both_languages_and_both_completion_forms():
    reward = FormatReward()
    assert reward.__name__ == "format"
    assert reward(completions=[GOOD_ES, GOOD_EN, conv(GOOD_ES)]) == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_format_reward_rejects_malformed_layouts(name):
    assert FormatReward()(completions=[MALFORMED[name], conv(MALFORMED[name])]) == [0.0, 0.0]


def test_completion_text_handles_strings_messages_and_content_blocks():
    assert completion_text("x") == "x"
    assert completion_text(conv("y")) == "y"
    assert completion_text([{"role": "assistant", "content": [{"type": "text", "text": "z"}]}]) == "z"
    assert completion_text(None) == ""


# --------------------------------------------------------------------------------------------- rule verifier


@pytest.mark.parametrize(
    "final,reference,correct",
    [
        ("La respuesta es neumonía.", "Neumonía", True),
        ("La respuesta correcta es: NEUMONIA", "neumonía", True),
        ("Se trata de una neumonía adquirida en la comunidad.", "Neumonía", True),
        ("No es una neumonía, es una bronquitis aguda.", "Neumonía", False),
        ("Diagnóstico: enfermedad de Graves-Basedow.", "Enfermedad de Graves", True),
        ("Hipertiroidismo por bocio multinodular.", "Hipotiroidismo", False),
        ("N-acetilcisteína intravenosa.", "N-acetilcisteína", True),
        ("Acetilcisteína", "N acetilcisteina", False),
        ("The answer is iron deficiency anemia.", "Iron deficiency anemia", True),
        ("The final answer is: Parvovirus B19 infection", "Parvovirus B19 infection", True),
        ("It is not parvovirus B19 infection; it is folate deficiency.", "Parvovirus B19 infection", False),
        ("Vitamin B12 deficiency", "Folate deficiency", False),
    ],
)
def test_rule_match_normalised_answer_strings(final, reference, correct):
    assert rule_match(final, reference).correct is correct


OPTIONS_ES = {"A": "Betabloqueantes", "B": "Inhibidores de la enzima convertidora de angiotensina",
              "C": "Diuréticos tiazídicos", "D": "Alfabloqueantes"}  # fmt: skip
OPTIONS_EN = {"A": "Benign genetic carrier condition", "B": "Folate deficiency", "C": "Iron deficiency",
              "D": "Parvovirus B19 infection"}  # fmt: skip


@pytest.mark.parametrize(
    "final,options,gold,correct",
    [
        ("La respuesta es B.", OPTIONS_ES, "B", True),
        ("La respuesta correcta es la opción B.", OPTIONS_ES, "B", True),
        ("Opción B: inhibidores de la enzima convertidora de angiotensina.", OPTIONS_ES, "B", True),
        ("Elijo la C.", OPTIONS_ES, "B", False),
        ("Inhibidores de la enzima convertidora de angiotensina", OPTIONS_ES, "B", True),
        ("B", OPTIONS_ES, "B", True),
        ("The answer is D.", OPTIONS_EN, "D", True),
        ("Answer: (D) Parvovirus B19 infection", OPTIONS_EN, "D", True),
        ("Parvovirus B19 infection.", OPTIONS_EN, "D", True),
        ("I choose C.", OPTIONS_EN, "D", False),
        ("I think this is hard to say.", OPTIONS_EN, "D", False),  # "I" is not option I; unparsed = wrong
    ],
)
def test_rule_match_multiple_choice_letters_and_option_texts(final, options, gold, correct):
    assert rule_match(final, f"{gold}. {options[gold]}", options, gold).correct is correct


@pytest.mark.parametrize(
    "final,reference,correct",
    [
        ("La respuesta es B.", "B", True),
        ("opción B", "B", True),
        ("La respuesta es la C.", "B", False),
        ("The answer is B", "B. Folate deficiency", True),
        ("Folate deficiency", "B. Folate deficiency", True),
    ],
)
def test_rule_match_letter_references_without_options(final, reference, correct):
    assert rule_match(final, reference).correct is correct


def test_normalize_answer_ignores_accents_case_and_punctuation():
    assert normalize_answer("¡Neumonía   ADQUIRIDA, en la comunidad!") == "neumonia adquirida en la comunidad"


def test_rule_verifier_reward_uses_huatuo_scale_and_dataset_columns():
    reward = RuleVerifierReward()
    completions = [
        layout("Fiebre, tos, consolidación.", "La respuesta es neumonía."),  # right
        layout("Fiebre y tos.", "Bronquitis aguda."),  # well formed, wrong
        "Neumonía.",  # right answer, no layout -> 0
        layout("IECA en diabéticos con microalbuminuria.", "La respuesta correcta es la B."),  # mcq right
        layout("Pienso en diuréticos.", "Opción C."),  # mcq wrong
    ]
    import json

    options = ["", "", "", json.dumps(OPTIONS_ES), json.dumps(OPTIONS_ES)]
    out = reward(
        prompts=[None] * 5,
        completions=completions,
        reference=["Neumonía", "Neumonía", "Neumonía", "B. " + OPTIONS_ES["B"], "B. " + OPTIONS_ES["B"]],
        options=options,
        gold=["", "", "", "B", "B"],
    )
    assert out == [1.0, 0.1, 0.0, 1.0, 0.1]
    with pytest.raises(ConfigError):
        reward(completions=completions)


def test_custom_reward_loading(tmp_path):
    assert load_custom_reward("rl_toy_task:even_token_share")(completions=["a"], completion_ids=[[2, 3]]) == [0.5]
    with pytest.raises(ConfigError):
        load_custom_reward("no_such_module_xyz:f")


# -------------------------------------------------------------------------------------------- model verifier


@pytest.fixture(scope="module")
def verifier_dirs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("verifiers")
    return (build_tiny_verifier(tiny_model_dir, root / "random"),
            build_tiny_verifier(tiny_model_dir, root / "half", zero_head=True))  # fmt: skip


def _verifier(path, **kwargs):
    from types import SimpleNamespace

    cfg = SimpleNamespace(path=path, threshold=0.4, true_label=1, max_length=4000, correct_reward=1.0,
                          incorrect_reward=0.1, format_fail_reward=0.0, batch_size=4, dtype="float32")  # fmt: skip
    for key, value in kwargs.items():
        setattr(cfg, key, value)
    return ModelVerifierReward.from_config(cfg, "cpu")


def test_verifier_template_is_huatuos_layout():
    text = VERIFIER_TEMPLATE.format("resp", "ref", "<eos>")
    assert text.startswith("<Model Response>\nresp\n</Model Response>\n\n<Reference Answer>\nref\n</Reference Answer>")
    assert text.endswith('output "True" . If it is incorrect or fails to select the correct option (if options are '
                         'provided), output "False" . <eos>')  # fmt: skip


def test_model_verifier_threshold_and_format_gate(verifier_dirs):
    half = verifier_dirs[1]  # P(True) = 0.5 for every input
    completions = [GOOD_ES, conv(GOOD_EN), MALFORMED["reversed"], MALFORMED["no headers"]]
    refs = ["Neumonía", "Iron deficiency anemia", "Neumonía", "Neumonía"]
    reward = _verifier(half)
    assert reward.__name__ == "model_verifier"
    assert reward.p_true(["a", "b c"], ["x", "y"]) == pytest.approx([0.5, 0.5])
    assert reward(completions=completions, reference=refs) == [1.0, 1.0, 0.0, 0.0]  # 0.5 > 0.4
    assert _verifier(half, threshold=0.5)(completions=completions, reference=refs) == [0.1, 0.1, 0.0, 0.0]
    seen = {}
    reward(completions=completions, reference=refs, log_metric=lambda k, v: seen.__setitem__(k, v))
    assert seen["verifier/p_true_mean"] == pytest.approx(0.5)


def test_model_verifier_sees_the_final_response_and_reference(verifier_dirs):
    reward = _verifier(verifier_dirs[0])
    calls = []
    original = reward.inputs

    def spy(responses, references):
        calls.append((list(responses), list(references)))
        return original(responses, references)

    reward.inputs = spy
    out = reward(completions=[GOOD_ES], reference=["Neumonía"])
    assert out[0] in (0.1, 1.0)
    assert calls == [(["La respuesta es neumonía adquirida en la comunidad."], ["Neumonía"])]


def test_long_response_is_cut_in_the_middle_never_the_reference(verifier_dirs, tiny_tokenizer):
    reference = "Enfermedad de Graves (hipertiroidismo autoinmune)"
    head, tail = "INICIO.", "FIN."
    response = head + " " + "La paciente presenta taquicardia, temblor y exoftalmos. " * 150 + tail
    ids = lambda t: tiny_tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    # Room for ~60 response tokens beside the template and the reference.
    max_length = len(ids(VERIFIER_TEMPLATE.format("[...]", reference, tiny_tokenizer.eos_token))) + 60
    full = VERIFIER_TEMPLATE.format(response, reference, tiny_tokenizer.eos_token)
    assert len(ids(full)) > 5 * max_length
    # HuatuoGPT-o1's right-side truncation loses the reference and the instruction:
    cut = tiny_tokenizer.decode(tiny_tokenizer(full, add_special_tokens=False, max_length=max_length,
                                               truncation=True)["input_ids"])  # fmt: skip
    assert reference not in cut and "<Reference Answer>" not in cut
    # Ours keeps them whole and cuts the response's middle:
    text, truncated = build_verifier_input(tiny_tokenizer, response, reference, max_length)
    assert truncated and len(ids(text)) <= max_length
    assert f"<Reference Answer>\n{reference}\n</Reference Answer>" in text
    assert text.endswith(tiny_tokenizer.eos_token) and 'output "False" .' in text
    kept = text.split("<Model Response>\n", 1)[1].split("\n</Model Response>", 1)[0]
    assert kept.startswith(head) and kept.endswith(tail) and " [...] " in kept
    # Short inputs are untouched (exactly HuatuoGPT-o1's text).
    assert build_verifier_input(tiny_tokenizer, "Graves.", reference, max_length) == (
        VERIFIER_TEMPLATE.format("Graves.", reference, tiny_tokenizer.eos_token), False)
    # And the reward runs on it end to end with a small max_length.
    reward = _verifier(verifier_dirs[0], max_length=max_length)
    out = reward(completions=[layout("Pienso.", response), GOOD_ES], reference=[reference, "Neumonía"])
    assert all(r in (0.1, 1.0) for r in out) and reward.truncated == 1


def test_reference_longer_than_max_length_is_kept_whole(tiny_tokenizer):
    reference = "Respuesta de referencia muy larga. " * 40
    text, truncated = build_verifier_input(tiny_tokenizer, "Una respuesta. " * 50, reference, 64)
    assert truncated and reference in text and "<Model Response>\n[...]\n</Model Response>" in text
