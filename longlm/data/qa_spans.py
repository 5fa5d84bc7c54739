"""The best answer span of one window, shared by evaluation (`longlm.data.qa.postprocess`) and the pipeline."""
from __future__ import annotations

import numpy as np


def best_span(
    start: np.ndarray, end: np.ndarray, in_context: np.ndarray, max_answer_length: int, n_best: int | None = None
) -> tuple[float, int, int] | None:
    """(start + end logit, start token, end token) of the best span of context tokens with
    start <= end < start + max_answer_length; None when the window has no such span.

    `n_best=None` (the default everywhere in longlm) searches every allowed pair, in O(L * max_answer_length).
    `n_best=k` reproduces HF's run_qa: only the top-k starts x top-k ends, ranked over all tokens (question
    ones too), which finds nothing when those starts and ends lie more than `max_answer_length` apart, as
    they often do in a 4k-token window of an untrained model."""
    masked_start = np.where(in_context, start, -np.inf)
    masked_end = np.where(in_context, end, -np.inf)
    if n_best is None:
        best = (-np.inf, 0, 0)
        for width in range(min(max_answer_length, len(start))):
            scores = masked_start[: len(start) - width] + masked_end[width:]
            i = int(np.argmax(scores))
            if scores[i] > best[0]:
                best = (float(scores[i]), i, i + width)
        return best if np.isfinite(best[0]) else None
    first = np.argsort(-start, kind="stable")[:n_best, None]
    last = np.argsort(-end, kind="stable")[None, :n_best]
    valid = (last >= first) & (last - first < max_answer_length)
    scores = np.where(valid, masked_start[first] + masked_end[last], -np.inf)
    i, j = np.unravel_index(int(np.argmax(scores)), scores.shape)  # first maximum: HF's stable sort order
    return (float(scores[i, j]), int(first[i, 0]), int(last[0, j])) if np.isfinite(scores[i, j]) else None


def top_spans(
    start: np.ndarray, end: np.ndarray, in_context: np.ndarray, max_answer_length: int, k: int
) -> list[tuple[float, int, int]]:
    """The `k` best (start + end logit, start token, end token) spans of context tokens, best first, under the
    rule of `best_span` (whose single answer is the first of these); fewer when the window has fewer."""
    if not isinstance(k, int) or isinstance(k, bool) or k <= 0:
        raise ValueError(f"top_k must be a positive integer, got {k!r}.")
    masked_start = np.where(in_context, start, -np.inf)
    masked_end = np.where(in_context, end, -np.inf)
    candidates: list[tuple[float, int, int]] = []
    for width in range(min(max_answer_length, len(start))):
        scores = masked_start[: len(start) - width] + masked_end[width:]
        for i in np.argsort(-scores, kind="stable")[:k]:
            if np.isfinite(scores[i]):
                candidates.append((float(scores[i]), int(i), int(i) + width))
    # best score first; among equal scores the shorter span, then the earlier start (best_span's tie rule)
    candidates.sort(key=lambda span: (-span[0], span[2] - span[1], span[1]))
    return candidates[:k]
