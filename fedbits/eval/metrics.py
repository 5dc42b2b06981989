"""Generation metrics: ROUGE-L for free-form completions, exact match for short answers.

Exact match normalises away what a correct model may still vary (case, spacing, a
trailing full stop) and compares numeric answers by value, GSM8K style, so "The answer
is 42." counts for the answer "42". The number taken from a prediction is the one after
the last ``####`` when there is one (the GSM8K answer marker), else the *last* number in
the text: step-by-step answers end with their result, so the last number is the answer
far more often than the first.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from rouge_score.rouge_scorer import RougeScorer

# A sign only when it does not follow a word or number ("53-21" is 53 and 21), and commas
# only as thousands separators ("1,000" is one number, "5,19" two).
_NUMBER = re.compile(r"(?:(?<![\w.])[-+])?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_QUOTES = "\"'`"
_TRAILING_PUNCTUATION = ".,!?;:"


def _check_lengths(predictions: Sequence[str], references: Sequence[object]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure x100 (``rouge-score``'s tokenizer: lowercase, alphanumerics)."""
    _check_lengths(predictions, references)
    scorer = RougeScorer(["rougeL"])
    total = sum(
        scorer.score(target=ref, prediction=pred)["rougeL"].fmeasure
        for pred, ref in zip(predictions, references, strict=True)
    )
    return 100.0 * total / len(predictions)


def normalize_text(text: str) -> str:
    """Lowercase, collapse whitespace, strip surrounding quotes and trailing punctuation."""
    text = " ".join(text.lower().split()).strip(_QUOTES + " ")
    return text.rstrip(_TRAILING_PUNCTUATION + _QUOTES + " ")


def _to_float(number: str) -> float:
    return float(number.replace(",", ""))


def parse_number(text: str) -> float | None:
    """``text`` as a number when it is exactly one (``"1,000"``, ``"-3.5"``), else None."""
    text = normalize_text(text)
    return _to_float(text) if _NUMBER.fullmatch(text) else None


def extract_final_number(prediction: str) -> float | None:
    """The first number after the last ``####``, else the last number in the text, else None."""
    if "####" in prediction:
        after_marker = _NUMBER.findall(prediction.rsplit("####", 1)[1])
        if after_marker:
            return _to_float(after_marker[0])
    numbers = _NUMBER.findall(prediction)
    return _to_float(numbers[-1]) if numbers else None


def is_exact_match(prediction: str, answer: str) -> bool:
    """Numeric answers compare by value with the prediction's final number; others compare
    as normalised text."""
    expected = parse_number(answer)
    if expected is None:
        return normalize_text(prediction) == normalize_text(answer)
    got = extract_final_number(prediction)
    return got is not None and math.isclose(got, expected, rel_tol=1e-9, abs_tol=1e-9)


def exact_match(predictions: Sequence[str], answers: Sequence[str]) -> float:
    """Percentage of predictions that match their answer (see :func:`is_exact_match`)."""
    _check_lengths(predictions, answers)
    hits = sum(is_exact_match(p, a) for p, a in zip(predictions, answers, strict=True))
    return 100.0 * hits / len(predictions)
