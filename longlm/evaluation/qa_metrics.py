"""The official QA metrics, to the letter, so numbers compare with published ones.

SQuAD: the v2.0 `evaluate-v2.0.py` semantics (v1.1 files score the same, with no NoAns part): answers are
normalised (lower case, ASCII punctuation deleted, articles a/an/the dropped, whitespace collapsed); gold
answers that normalise to nothing are dropped and a question left without any has gold [""]; EM and F1 take
the max over gold answers; F1 is token overlap, 1 when both sides are empty and 0 when only one is; a
`na_probs` above `na_threshold` scores the question as a no-answer prediction. TriviaQA: its
`triviaqa_evaluation.py`: underscores and punctuation (ASCII plus ‘ ’ ´ `) become spaces, then lower case,
articles, whitespace; EM and F1 take the max over the aliases, and its F1 is 0 whenever nothing overlaps
(two empty strings included, unlike SQuAD's).

Both score every example: a missing prediction counts as "" (the official scripts skip it, or fail).
"""
from __future__ import annotations

import re
import string
from collections import Counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from longlm.data.qa import QAExample

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_SQUAD_PUNCTUATION = frozenset(string.punctuation)
_TRIVIAQA_PUNCTUATION = frozenset(string.punctuation + "‘’´`")


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower, remove punctuation, remove articles, fix whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _SQUAD_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _squad_tokens(text: str) -> list[str]:
    return normalize_answer(text).split() if text else []


def exact_match(prediction: str, gold: str) -> int:
    return int(normalize_answer(gold) == normalize_answer(prediction))


def f1(prediction: str, gold: str) -> float:
    """Token-overlap F1 of SQuAD: both empty -> 1, exactly one empty -> 0."""
    gold_tokens, prediction_tokens = _squad_tokens(gold), _squad_tokens(prediction)
    if not gold_tokens or not prediction_tokens:
        return float(gold_tokens == prediction_tokens)
    same = sum((Counter(gold_tokens) & Counter(prediction_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(prediction_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def _percentages(exact: list[float], f1s: list[float]) -> dict:
    return {"exact": 100.0 * sum(exact) / len(exact), "f1": 100.0 * sum(f1s) / len(f1s), "total": len(exact)}


def squad_scores(
    examples: list[QAExample],
    predictions: dict[str, str],
    na_probs: dict[str, float] | None = None,
    na_threshold: float = 1.0,
) -> dict:
    """exact, f1, total plus HasAns_* / NoAns_* (each only when such questions exist), percentages 0-100.

    A question has an answer when its example lists answers. A missing prediction counts as ""; a
    missing na_prob as 0."""
    if not examples:
        raise ValueError("squad_scores got no examples to score.")
    exact: list[float] = []
    f1s: list[float] = []
    for example in examples:
        golds = [answer["text"] for answer in example.answers if normalize_answer(answer["text"])] or [""]
        prediction = predictions.get(example.id, "")
        if na_probs is not None and na_probs.get(example.id, 0.0) > na_threshold:
            exact.append(float(not example.answers))
            f1s.append(float(not example.answers))
        else:
            exact.append(float(max(exact_match(prediction, gold) for gold in golds)))
            f1s.append(max(f1(prediction, gold) for gold in golds))
    scores = _percentages(exact, f1s)
    for prefix, keep in (("HasAns", True), ("NoAns", False)):
        rows = [i for i, example in enumerate(examples) if bool(example.answers) == keep]
        if rows:
            part = _percentages([exact[i] for i in rows], [f1s[i] for i in rows])
            scores.update({f"{prefix}_{key}": value for key, value in part.items()})
    return scores


def normalize_triviaqa(text: str) -> str:
    """TriviaQA's normalisation: underscores to spaces, lower, punctuation to spaces, remove articles,
    fix whitespace."""
    text = text.replace("_", " ").lower()
    text = "".join(" " if ch in _TRIVIAQA_PUNCTUATION else ch for ch in text)
    return " ".join(_ARTICLES.sub(" ", text).split())


def triviaqa_exact_match(prediction: str, gold: str) -> int:
    return int(normalize_triviaqa(prediction) == normalize_triviaqa(gold))


def triviaqa_f1(prediction: str, gold: str) -> float:
    """TriviaQA's token F1: 0 when no token overlaps, even for two empty strings."""
    prediction_tokens, gold_tokens = normalize_triviaqa(prediction).split(), normalize_triviaqa(gold).split()
    same = sum((Counter(prediction_tokens) & Counter(gold_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(prediction_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def triviaqa_scores(examples: list[QAExample], predictions: dict[str, str]) -> dict:
    """{"exact_match", "f1", "total"}: max over each example's aliases, percentages 0-100. A missing
    prediction counts as ""."""
    if not examples:
        raise ValueError("triviaqa_scores got no examples to score.")
    exact = f1_sum = 0.0
    for example in examples:
        if not example.aliases:
            raise ValueError(f"Example '{example.id}' has no aliases; TriviaQA scoring needs its accepted answers.")
        prediction = predictions.get(example.id, "")
        exact += max(triviaqa_exact_match(prediction, alias) for alias in example.aliases)
        f1_sum += max(triviaqa_f1(prediction, alias) for alias in example.aliases)
    return {"exact_match": 100.0 * exact / len(examples), "f1": 100.0 * f1_sum / len(examples), "total": len(examples)}


def score_predictions(
    examples: list[QAExample], predictions: dict[str, str], na_probs: dict[str, float] | None = None
) -> dict:
    """TriviaQA's metric when the examples carry aliases, else SQuAD's (the only one `na_probs` applies to)."""
    if any(example.aliases is not None for example in examples):
        return triviaqa_scores(examples, predictions)
    return squad_scores(examples, predictions, na_probs)
