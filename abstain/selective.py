"""Selective-prediction maths in numpy: scores, coverage, selective risk, risk–coverage.

Conventions: ``scores`` float ``[N]``, higher = more confident (answered first);
``errors`` ``[N]`` of 0/1 (1 = the prediction is wrong, the 0/1 loss). A selector with
threshold ``t`` answers sample ``i`` iff ``scores[i] >= t``.

* coverage φ(t) = mean(scores >= t)
* selective risk r(t) = sum(errors · [scores >= t]) / sum(scores >= t)

(Geifman & El-Yaniv, "Selective classification for deep neural networks", NeurIPS 2017;
SelectiveNet, ICML 2019.)
"""

from __future__ import annotations

import math

import numpy as np

from abstain.contract import (
    SCORE_COMBINED,
    SCORE_NAMES,
    SCORE_SELECTION,
    SCORE_SOFTMAX_RESPONSE,
    TABLE_COVERAGES,
)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of float ``[N, K]`` logits, computed stably in float64."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


def softmax_response(logits: np.ndarray) -> np.ndarray:
    """Max softmax probability ``[N]`` — the classic post-hoc confidence score."""
    return softmax(logits).max(axis=1)


def selection_scores(logits: np.ndarray, selection: np.ndarray, score: str) -> np.ndarray:
    """The named score ``[N]`` from the graph's outputs (see ``abstain.contract.SCORE_NAMES``).

    ``combined`` is the geometric mean ``sqrt(g · softmax_response)``: high only when both
    the selection head and the classifier are confident; stays in [0, 1].
    """
    if score == SCORE_SELECTION:
        return np.asarray(selection, dtype=np.float64).reshape(-1)
    if score == SCORE_SOFTMAX_RESPONSE:
        return softmax_response(logits)
    if score == SCORE_COMBINED:
        g = np.clip(np.asarray(selection, dtype=np.float64).reshape(-1), 0.0, 1.0)
        return np.sqrt(g * softmax_response(logits))
    raise ValueError(f"score should be one of {', '.join(SCORE_NAMES)}, but got {score!r}")


def _check_pair(scores: np.ndarray, errors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    errors = np.asarray(errors, dtype=np.float64).reshape(-1)
    if scores.shape != errors.shape:
        raise ValueError(
            f"scores and errors should have the same length, but got {scores.size} and {errors.size}"
        )
    if scores.size == 0:
        raise ValueError("scores should hold at least one sample, but got none")
    return scores, errors


def risk_coverage_curve(scores: np.ndarray, errors: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The empirical risk–coverage curve at every distinct threshold.

    Returns ``(coverages, risks, thresholds)``, each ``[U]`` for the ``U`` distinct scores in
    descending order: the selector ``scores >= thresholds[j]`` has coverage ``coverages[j]``
    and selective risk ``risks[j]``. Tied scores enter together (a threshold cannot split them).
    """
    scores, errors = _check_pair(scores, errors)
    order = np.argsort(-scores, kind="stable")
    s, e = scores[order], errors[order]
    cum_err = np.cumsum(e)
    # last index of each run of equal scores
    last = np.flatnonzero(np.r_[s[1:] != s[:-1], True])
    kept = last + 1
    return kept / s.size, cum_err[last] / kept, s[last]


def risk_at_coverage(scores: np.ndarray, errors: np.ndarray, coverage: float) -> float:
    """Selective risk when answering the ``ceil(coverage · N)`` highest-scoring samples.

    Ties at the cut are resolved in expectation over random tie-breaking: the tied group
    contributes its mean error for the places left. ``coverage`` in (0, 1].
    """
    scores, errors = _check_pair(scores, errors)
    if not 0.0 < coverage <= 1.0:
        raise ValueError(f"coverage should be in (0, 1], but got {coverage}")
    n = scores.size
    m = max(1, math.ceil(coverage * n - 1e-9))
    order = np.argsort(-scores, kind="stable")
    s, e = scores[order], errors[order]
    cut = s[m - 1]
    above = s > cut
    tied = s == cut
    n_above = int(above.sum())
    err = e[above].sum() + (m - n_above) * e[tied].mean()
    return float(err / m)


def risk_at_coverages(scores: np.ndarray, errors: np.ndarray,
                      coverages: tuple[str, ...] = TABLE_COVERAGES) -> dict[str, float]:
    """``{coverage string: risk}`` for the paper's table coverages (keys as in ``TABLE_COVERAGES``)."""
    return {c: risk_at_coverage(scores, errors, float(c)) for c in coverages}


def aurc(scores: np.ndarray, errors: np.ndarray) -> float:
    """Area under the risk–coverage curve: mean over m = 1..N of the risk of the top-m samples.

    Ties are resolved in expectation (each tied group contributes its mean error), so the
    value does not depend on sort order. Lower is better; a perfect ranking of e errors in
    N samples gives the E-AURC baseline (see ``eaurc``).
    """
    scores, errors = _check_pair(scores, errors)
    order = np.argsort(-scores, kind="stable")
    s, e = scores[order], errors[order]
    # replace each error by its tie-group mean: expectation over random tie-breaking
    group_start = np.r_[True, s[1:] != s[:-1]]
    group_id = np.cumsum(group_start) - 1
    group_mean = np.bincount(group_id, weights=e) / np.bincount(group_id)
    e_exp = group_mean[group_id]
    m = np.arange(1, s.size + 1)
    return float(np.mean(np.cumsum(e_exp) / m))
