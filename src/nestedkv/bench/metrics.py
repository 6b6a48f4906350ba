"""RULER's scores, as RULER and kvpress compute them: case-insensitive substring match, in [0, 100].

* ``string_match_all`` (every task but QA): the fraction of the reference strings found in the
  prediction, averaged over samples.
* ``string_match_part`` (QA): 1 if any of the references is found, averaged over samples.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

METRICS = ("string_match_all", "string_match_part")


def _found(prediction: str, answers: Sequence[str]) -> list[float]:
    text = prediction.lower()
    return [1.0 if answer.lower() in text else 0.0 for answer in answers]


def _all(prediction: str, answers: Sequence[str]) -> float:
    return 100.0 * sum(_found(prediction, answers)) / len(answers)


def _part(prediction: str, answers: Sequence[str]) -> float:
    return 100.0 * max(_found(prediction, answers))


_SCORERS: dict[str, Callable[[str, Sequence[str]], float]] = {
    "string_match_all": _all,
    "string_match_part": _part,
}


def score_sample(metric: str, prediction: str, answers: Sequence[str]) -> float:
    """Score in [0, 100] of one prediction against its reference strings, with ``metric``."""
    try:
        scorer = _SCORERS[metric]
    except KeyError:
        raise ValueError(f"unknown metric {metric!r}; choose one of {METRICS}") from None
    if not answers:
        raise ValueError("a sample needs at least one reference answer")
    return scorer(prediction, answers)


def _mean(metric: str, predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    if len(predictions) != len(references) or not predictions:
        raise ValueError("need as many predictions as references, and at least one")
    scores = [score_sample(metric, p, r) for p, r in zip(predictions, references, strict=True)]
    return sum(scores) / len(scores)


def string_match_all(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean over samples of the percentage of a sample's references found in its prediction."""
    return _mean("string_match_all", predictions, references)


def string_match_part(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Percentage of samples whose prediction contains at least one of its references."""
    return _mean("string_match_part", predictions, references)
