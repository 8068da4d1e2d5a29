"""The generation check's language figure: Spanish or English by function words, 'unknown' when too short."""

import pytest

from medsft.eval.generate import summarize_generations
from medsft.eval.language import answer_language, language_counts

ES = ("## Thinking\n\nVeamos, el paciente tiene fiebre y tos, y la radiografía muestra una consolidación en el "
      "lóbulo inferior.\n\n## Final Response\n\nSe trata de una neumonía; debe recibir tratamiento antibiótico.")
EN = ("## Thinking\n\nThe patient has a fever and a cough, and the chest film shows a consolidation in the lower "
      "lobe.\n\n## Final Response\n\nThis is pneumonia; it should be treated with antibiotics.")


@pytest.mark.parametrize("text,language", [
    (ES, "es"), (EN, "en"), ("B", "unknown"), ("", "unknown"), ("insulina insulina insulina", "unknown"),
    ("La diabetes mellitus es una enfermedad que se trata con insulina y con dieta.", "es"),
    ("Diabetes mellitus is a disease that is treated with insulin and with diet.", "en"),
    ("de de de de de de de de", "es"),  # a repeated Spanish word still reads Spanish
])
def test_answer_language(text, language):
    assert answer_language(text) == language


def test_mixed_answers_are_counted_and_reach_the_generation_summary():
    texts = [ES, EN, ES, "C"]
    assert language_counts(texts) == {"es": 2, "en": 1, "unknown": 1}
    summary = summarize_generations(texts)
    assert (summary["n_spanish"], summary["n_english"]) == (2, 1)
