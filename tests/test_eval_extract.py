"""Honest answer extraction on hand-written outputs: every path, English and Spanish, the traps."""

import pytest

from medsft.eval.extract import UNPARSED, extract_answer

OPT4 = {"A": "Fibronectin", "B": "Collagen", "C": "Integrins", "D": "Proteoglycans"}
OPT4_ES = {"A": "Fibronectina.", "B": "Colágeno.", "C": "Integrinas.", "D": "Proteoglucanos."}
# MMLU-Pro: 10 options, A..J, so "I" and "A" are real options.
OPT10 = {k: f"option text {k.lower()}{k.lower()}" for k in "ABCDEFGHIJ"}
PUBMEDQA = {"A": "yes", "B": "no", "C": "maybe"}
HEADQA5 = {"A": "Uno.", "B": "Dos.", "C": "Tres.", "D": "Cuatro.", "E": "Cinco."}


def ex(text, options=OPT4, numeric=False):
    return extract_answer(text, options, numeric=numeric)


@pytest.mark.parametrize(
    "text, answer",
    [
        ("The answer is B.", "B"),
        ("The correct answer is (C).", "C"),
        ("So the final answer is **D**", "D"),
        ("Answer: A", "A"),
        ("**Answer:** C", "C"),
        ("The best option is B", "B"),
        ("Option D is correct.", "D"),
        ("I choose C.", "C"),
        ("I'll go with A, because fibronectin binds.", "A"),
        ("The answer is B. Wait, re-reading it, the answer is C.", "C"),  # the last declaration wins
    ],
)
def test_english_patterns(text, answer):
    e = ex(text)
    assert (e.answer, e.method) == (answer, "pattern")


@pytest.mark.parametrize(
    "text, answer",
    [
        ("La respuesta correcta es la B.", "B"),
        ("La respuesta es C", "C"),
        ("Respuesta: D", "D"),
        ("La opción correcta es la A.", "A"),
        ("Creo que la correcta es la opción B", "B"),
        ("La opción C es la correcta.", "C"),
        ("Elijo la D porque los proteoglucanos...", "D"),
        ("Por tanto, la respuesta final sería la B.", "B"),
    ],
)
def test_spanish_patterns(text, answer):
    e = ex(text, OPT4_ES)
    assert (e.answer, e.method) == (answer, "pattern")


def test_final_response_region_is_used_first():
    text = (
        "## Thinking\n\nOption A looks tempting, and the answer is A at first sight... but no.\n\n"
        "## Final Response\n\nThe answer is C."
    )
    e = ex(text)
    assert (e.answer, e.method, e.region) == ("C", "pattern", "final")
    # the thinking's declaration is used only when the final response names no option
    text2 = "## Thinking\n\nSo the answer is D.\n\n## Final Response\n\nProteoglycans resist compression well."
    e2 = ex(text2, {"A": "x1", "B": "x2", "C": "x3", "D": "Proteoglycan aggregates"})
    assert (e2.answer, e2.method, e2.region) == ("D", "thinking_pattern", "thinking")


@pytest.mark.parametrize(
    "text, answer",
    [
        ("B", "B"),
        ("B.", "B"),
        ("B) Collagen", "B"),
        ("(C)", "C"),
        ("**D**", "D"),
        ("C: Integrins, because...", "C"),
        ("Option B", "B"),
        ("Collagen is the main fibre.\n\nB", "B"),  # last line is only a marker
    ],
)
def test_leading_marker(text, answer):
    e = ex(text)
    assert e.answer == answer and e.method == "leading"


def test_i_think_trap_on_ten_options():
    # HuatuoGPT's loose regex reads "I" from "I think"; an honest scorer must not.
    e = ex("I think the right choice depends on the histology.", OPT10)
    assert e.answer is None and e.method == UNPARSED
    e = ex("## Thinking\n\nI am not sure.\n\n## Final Response\n\nI think it is hard to say.", OPT10)
    assert e.answer is None
    # ...but an explicit pattern naming I is option I
    assert ex("The answer is I.", OPT10).answer == "I"
    assert ex("I. option text ii", OPT10).answer == "I"
    assert ex("(I)", OPT10).answer == "I"
    # an article "A" followed by a word is not option A
    assert ex("A 45-year-old man would need more tests.", OPT10).answer is None


def test_ten_option_letters():
    assert ex("The answer is J.", OPT10).answer == "J"
    assert ex("Answer: H", OPT10).answer == "H"
    assert ex("La respuesta correcta es la G", OPT10).answer == "G"
    # a letter outside the item's options is not an answer
    assert ex("The answer is J.", OPT4).answer is None
    # lowercase letters are words, not options ("the answer is a drug")
    assert ex("The answer is a protein of the matrix.", OPT10).answer is None


def test_mentions_only_when_unambiguous():
    e = ex("Looking at option B, collagen forms fibres with high tensile strength.")
    assert (e.answer, e.method) == ("B", "mention")
    # two different options named: ambiguous -> not a mention answer
    e = ex("Option A binds cells, option B forms fibres.")
    assert e.method != "mention"
    # a rejected option is not the answer
    assert ex("Option A is incorrect here.").answer is None


def test_option_text_match():
    e = ex("Collagen")
    assert (e.answer, e.method) == ("B", "option_text")
    e = ex("## Thinking\n\n...\n\n## Final Response\n\nColágeno, por su resistencia a la tensión.", OPT4_ES)
    assert (e.answer, e.method) == ("B", "option_text")
    # two option texts mentioned: ambiguous -> unparsed
    assert ex("Either collagen or integrins.").answer is None


def test_pubmedqa_yes_no_maybe():
    assert ex("## Thinking\n\n...\n\n## Final Response\n\nYes.", PUBMEDQA).answer == "A"
    assert ex("No, the trial found no difference.", PUBMEDQA).answer == "B"
    assert ex("Maybe; the evidence is mixed.", PUBMEDQA).answer == "C"
    assert ex("The answer is C.", PUBMEDQA).answer == "C"
    assert ex("Sí, el ensayo lo demuestra.", PUBMEDQA).answer == "A"
    # both words inside a sentence that starts with neither: ambiguous
    assert ex("There is evidence: yes for adults, no for children.", PUBMEDQA).answer is None


def test_headqa_numeric_options():
    assert ex("La respuesta correcta es la 3.", HEADQA5, numeric=True).answer == "C"
    assert ex("Opción 5", HEADQA5, numeric=True).answer == "E"
    assert ex("La opción 2 es la correcta", HEADQA5, numeric=True).answer == "B"
    assert ex("Creo que es la respuesta 4, por la clínica.", HEADQA5, numeric=True).answer == "D"
    assert ex("The answer is 1.", HEADQA5, numeric=True).answer == "A"
    # letters still work on numeric sets
    assert ex("La respuesta es E", HEADQA5, numeric=True).answer == "E"
    # numbers are not options on lettered sets, nor out of range
    assert ex("The answer is 2.", OPT4).answer is None
    assert ex("La respuesta correcta es la 7.", HEADQA5, numeric=True).answer is None


def test_unparsed_and_empty():
    for text in ("", "   ", "I do not know.", "## Thinking\n\nhmm\n\n## Final Response\n\nIt depends."):
        e = ex(text)
        assert e.answer is None and e.method == UNPARSED and not e.parsed


def test_bad_option_keys():
    with pytest.raises(ValueError):
        extract_answer("A", {"1": "x", "2": "y"})


def test_echoed_option_list_is_not_an_answer():
    # SmolLM2 before fine-tuning often repeats the options; that is not choosing one.
    echo = "The question asks:\nA. Fibronectin\nB. Collagen\nC. Integ"
    assert ex(echo).answer is None
    assert ex("A. Fibronectin\nB. Collagen\nC.").answer is None  # the list cut by max_new_tokens
    # an echo followed by a real answer keeps the answer
    assert ex("A. Fibronectin\nB. Collagen\nC. Integrins\nD. Proteoglycans\n\nThe answer is B.").answer == "B"
    assert ex("A. Fibronectin\nB. Collagen\n\nB.").answer == "B"
    # a single "X. <text>" line is an answer
    assert ex("B. Collagen").answer == "B"


def test_numbered_list_is_not_a_numeric_choice():
    assert ex("1. La clínica sugiere una causa infecciosa.\n2. Además...", HEADQA5, numeric=True).answer is None
    assert ex("3. Tres.", HEADQA5, numeric=True).answer == "C"
    assert ex("3", HEADQA5, numeric=True).answer == "C"
    assert ex("Opción 4: porque...", HEADQA5, numeric=True).answer == "D"


def test_invented_option_list_is_not_an_answer():
    # consecutive "A. / B. / C." lines are a list even when the texts are not the real options
    assert ex("A. Fase de negación.\nB. Fase de Reorganización.\nC. Fase de Resolución.", OPT4_ES).answer is None
    assert ex("Respuesta:\nA. algo\nB. otra cosa\n\nLa respuesta correcta es la B.", OPT4_ES).answer == "B"
    assert ex("Es un trastorno:\nA. Que afecta a mujeres.\nB. Que afecta a hombres.\nC. Ambos.\nD", OPT4_ES).answer is None


# ------------------------------------------------ a letter that starts a word is not a choice, after any cue

OPT5_ES = {"A": "Insulina.", "B": "Glucagón.", "C": "Cortisol.", "D": "Tiroxina.", "E": "Adrenalina."}
# No benchmark has options past J; a wide set makes the Spanish words "O", "U", "Y" valid letters, so these
# cases test the rule itself, not the letter range.
OPT_WIDE = {k: f"texto {k.lower()}{k.lower()}" for k in "ABCDEFGHIJKLMNOPQRSTUVWXY"}
ROMAN = {"A": "I", "B": "II", "C": "III", "D": "IV"}  # option texts that are letters too
ABO = {"A": "A", "B": "B", "C": "AB", "D": "O"}


@pytest.mark.parametrize(
    "text, options",
    [
        # Spanish preposition/conjunction "A", "E", "O", "Y", "U" starting the sentence after the cue
        ("Respuesta: A menudo se asocia a hipertiroidismo.", OPT4_ES),
        ("Respuesta: A menudo se asocia a hipertiroidismo.", OPT10),
        ("La respuesta correcta es A veces difícil de precisar.", OPT4_ES),
        ("Respuesta: E incluso podría ser otra.", OPT5_ES),
        ("La respuesta es E incluso sin datos.", OPT10),
        ("La respuesta es O bien la primera o la segunda.", OPT_WIDE),
        ("Respuesta: Y además hay que descartar un tumor.", OPT_WIDE),
        ("La respuesta correcta es U otra similar.", OPT_WIDE),
        ("Respuesta: O bien una cosa o la otra.", OPT_WIDE),
        ("**Respuesta:** A menudo, nada.", OPT4_ES),
        # English article "A" and pronoun "I" after the cue (10 options: A and I are real options)
        ("Answer: I don't know.", OPT10),
        ("Answer: I'm not sure.", OPT10),
        ("**Answer:** I am not sure", OPT10),
        ("The answer is I guess unclear.", OPT10),
        ("The answer is A deficiency of folate.", OPT4),
        ("The answer is A deficiency of folate.", OPT10),
        ("Answer: A 45-year-old man needs more tests.", OPT10),
        ("The best option is A drug that blocks it.", OPT10),
        ("I choose A different approach.", OPT10),
        # a letter as the subject of a sentence is not declared the answer
        ("Answer: B is unlikely here.", OPT4),
        ("Answer: B is incorrect, C is right.", OPT4),
        # a letter joined to a word
        ("The answer is B-cell lymphoma.", OPT10),
        # the same promise in the other steps: leading, thinking_pattern, option_text, numbers
        ("A menudo la clínica orienta.", OPT4_ES),
        ("E incluso así, no hay datos.", OPT5_ES),
        ("## Thinking\n\nThe answer is A deficiency of B12.\n\n## Final Response\n\nFolate matters.", OPT4),
        ("## Thinking\n\nRespuesta: A menudo...\n\n## Final Response\n\nNo lo sé.", OPT4_ES),
        ("Answer: I don't know.", ROMAN),
        ("A menudo es difícil saberlo.", ABO),
        ("O bien, no lo sé.", ABO),
        ("so I, after checking, think nothing.", OPT10),
        ("Thus A doctor should check.", OPT10),
    ],
)
def test_letter_starting_a_word_is_not_a_choice(text, options):
    e = ex(text, options)
    assert (e.answer, e.method) == (None, UNPARSED), e


def test_number_starting_a_quantity_is_not_a_choice():
    assert ex("La respuesta es 2 veces más frecuente.", HEADQA5, numeric=True).answer is None
    assert ex("The answer is 3 mg per kg.", HEADQA5, numeric=True).answer is None
    assert ex("La respuesta correcta es la 3, por la clínica.", HEADQA5, numeric=True).answer == "C"


@pytest.mark.parametrize(
    "text, options, answer, method",
    [
        # a letter that stands alone after the cue still parses
        ("The answer is B.", OPT4, "B", "pattern"),
        ("Respuesta: B", OPT4_ES, "B", "pattern"),
        ("La respuesta correcta es la B, porque el colágeno...", OPT4_ES, "B", "pattern"),
        ("Answer: (C)", OPT4, "C", "pattern"),
        ("Answer: (C) because integrins bind", OPT4, "C", "pattern"),
        ("**B**", OPT4, "B", "leading"),
        ("B) Insulina", {"A": "Glucagón", "B": "Insulina", "C": "Cortisol"}, "B", "leading"),
        ("Respuesta: A", OPT5_ES, "A", "pattern"),
        ("Respuesta: E", OPT5_ES, "E", "pattern"),
        ("Respuesta: E. Adrenalina", OPT5_ES, "E", "pattern"),
        ("Respuesta: E Adrenalina", OPT5_ES, "E", "pattern"),  # followed by its own text
        ("The answer is B (Collagen).", OPT4, "B", "pattern"),
        ("The answer is B - Collagen", OPT4, "B", "pattern"),
        ("The answer is **A**, fibronectin.", OPT4, "A", "pattern"),
        ("Answer: A\nFibronectin binds cells.", OPT4, "A", "pattern"),
        ("The answer is C, integrins.", OPT4, "C", "pattern"),
        # a justification or an affirmation after the letter
        ("The answer is B because collagen is strong.", OPT4, "B", "pattern"),
        ("La respuesta es A porque la insulina baja la glucosa.", OPT5_ES, "A", "pattern"),
        ("Answer: B is correct.", OPT4, "B", "pattern"),
        ("Answer: B is the correct answer.", OPT4, "B", "pattern"),
        # MMLU-Pro letters up to J
        ("Answer: J", OPT10, "J", "pattern"),
        ("Answer: I", OPT10, "I", "pattern"),
        ("Answer: I.", OPT10, "I", "pattern"),
        ("Answer: A", OPT10, "A", "pattern"),
        ("The answer is I, option text ii.", OPT10, "I", "pattern"),
        # a hedge inside the declaration: the letter after it, not the pronoun
        ("Answer: I think it is C", OPT10, "C", "pattern"),
        ("Answer: I think C.", OPT10, "C", "pattern"),
        ("Respuesta: creo que es la C.", OPT4_ES, "C", "pattern"),
        # a conclusion that ends its sentence on a letter
        ("Answer: B is unlikely, so C.", OPT4, "C", "pattern"),
        ("Answer: B is unlikely, so C is the answer.", OPT4, "C", "pattern"),
        ("B is unlikely; therefore D.", OPT4, "D", "pattern"),
        ("La B es poco probable. Por tanto, la C.", OPT4_ES, "C", "pattern"),
        # the text names an option elsewhere: that option, never the letter starting the sentence
        ("Respuesta: A menudo se asocia a la adrenalina.", OPT5_ES, "E", "option_text"),
        # option texts that are letters: matched like letters (case-sensitive, standing alone)
        ("Answer: I.", ROMAN, "A", "option_text"),
        ("El grupo es O.", ABO, "D", "option_text"),
        ("AB", ABO, "C", "option_text"),
    ],
)
def test_letter_standing_alone_still_parses(text, options, answer, method):
    e = ex(text, options)
    assert (e.answer, e.method) == (answer, method), e
