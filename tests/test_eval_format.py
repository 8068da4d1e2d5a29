"""Format compliance: `## Thinking` and `## Final Response` once each, in order, non-empty text after each."""

import pytest

from medsft.eval.format import check_format, compliance_rate
from medsft.eval.generate import summarize_generations

GOOD = "## Thinking\n\nThe patient has X, so Y.\n\n## Final Response\n\nThe answer is B."


def test_compliant_layout():
    fc = check_format(GOOD)
    assert fc.compliant and fc.reason is None
    assert fc.has_thinking and fc.has_final
    assert fc.thinking == "The patient has X, so Y."
    assert fc.final == "The answer is B."


@pytest.mark.parametrize(
    "text, reason_part",
    [
        ("", "empty output"),
        ("   \n", "empty output"),
        ("The answer is B.", "no '## Thinking' and no '## Final Response'"),
        ("## Final Response\n\nB", "missing '## Thinking'"),
        ("## Thinking\n\nreasoning only, truncated", "missing '## Final Response'"),
        ("## Thinking\n\na\n\n## Thinking\n\nb\n\n## Final Response\n\nB", "'## Thinking' appears 2 times"),
        ("## Thinking\n\na\n\n## Final Response\n\nB\n\n## Final Response\n\nC", "'## Final Response' appears 2 times"),
        ("## Final Response\n\nB\n\n## Thinking\n\nbecause", "comes before"),
        ("## Thinking\n\n\n## Final Response\n\nB", "nothing after '## Thinking'"),
        ("## Thinking\n\nreasoning\n\n## Final Response\n\n  \n", "nothing after '## Final Response'"),
    ],
)
def test_non_compliant_reasons(text, reason_part):
    fc = check_format(text)
    assert not fc.compliant
    assert reason_part in fc.reason


def test_headers_must_be_exact_lines():
    # "### Thinking" is not "## Thinking"; a header word inside a sentence is not a header.
    assert not check_format("### Thinking\n\nx\n\n## Final Response\n\nB").has_thinking
    assert not check_format("## Thinking process\n\nx\n\n## Final Response\n\nB").compliant
    assert not check_format("I put ## Thinking here\n\n## Final Response\n\nB").has_thinking
    # trailing spaces and a leading space on the header line are tolerated
    assert check_format(" ## Thinking \n\nx\n\n## Final Response  \n\nB").compliant


def test_spanish_answer_and_rate():
    es = "## Thinking\n\nEl paciente presenta...\n\n## Final Response\n\nLa respuesta correcta es la C."
    assert check_format(es).compliant
    assert compliance_rate([es, "nada", GOOD, ""]) == 0.5
    assert compliance_rate([]) == 0.0


def test_summarize_generations():
    s = summarize_generations([GOOD, "plain answer"])
    assert s["n"] == 2 and s["n_compliant"] == 1 and s["format_compliance"] == 0.5
    assert s["has_thinking"] == 0.5 and s["has_final"] == 0.5
    assert s["mean_chars"] == (len(GOOD) + len("plain answer")) / 2
    assert "mean_tokens" not in s
    assert summarize_generations([])["n"] == 0 and summarize_generations([])["n_compliant"] == 0
