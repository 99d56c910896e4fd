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
    SCORE_GINI,
    SCORE_MARGIN,
    SCORE_NAMES,
    SCORE_SCALE_LOGIT,
    SCORE_SCALE_PROBABILITY,
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


def top_two_margin(probs: np.ndarray) -> np.ndarray:
    """``p_(1) − p_(2)`` ``[N]`` of float ``[N, K]`` probabilities: the gap between the two most
    likely classes (``p_(1)`` alone when ``K = 1``)."""
    if probs.shape[1] < 2:
        return probs[:, 0].copy()
    top_two = np.partition(probs, probs.shape[1] - 2, axis=1)[:, -2:]
    return top_two[:, 1] - top_two[:, 0]


def sigmoid(z: np.ndarray) -> np.ndarray:
    """``1 / (1 + exp(-z))`` in float64, without overflow for large negative ``z``."""
    z = np.asarray(z, dtype=np.float64)
    return np.exp(-np.logaddexp(0.0, -z))


def score_scale(score: str, has_selection_logit: bool) -> str:
    """What a threshold on ``score`` is compared with: ``logit`` or ``probability``
    (``abstain.contract.SCORE_SCALE_*``): ``selection`` is g's logit when the graph gives it."""
    if score == SCORE_SELECTION and has_selection_logit:
        return SCORE_SCALE_LOGIT
    return SCORE_SCALE_PROBABILITY


def selection_scores(
    logits: np.ndarray, selection: np.ndarray, score: str, selection_logit: np.ndarray | None = None
) -> np.ndarray:
    """The named score ``[N]`` from the graph's outputs (see ``abstain.contract.SCORE_NAMES``).

    ``combined`` is the geometric mean ``sqrt(g · softmax_response)``: high only when both
    the selection head and the classifier are confident; stays in [0, 1]. ``margin`` and
    ``gini`` are post-hoc scores of the softmax p alone: ``p_(1) − p_(2)`` and ``Σ_k p_k²``
    (one minus DOCTOR's Gini impurity, Granese et al., NeurIPS 2021), both in [0, 1].

    With ``selection_logit`` (float ``[N]``, g's logit z, from graphs that export it):
    ``selection`` is z itself — a monotone function of g, so it ranks exactly as g does, but
    it does not tie where float32 g rounds to 1.0 (z > ~17) — and ``combined`` takes g as
    ``sigmoid(z)`` in float64 (distinct up to z ≈ 37 instead of 17).
    """
    if score == SCORE_SELECTION:
        source = selection if selection_logit is None else selection_logit
        return np.asarray(source, dtype=np.float64).reshape(-1)
    if score == SCORE_SOFTMAX_RESPONSE:
        return softmax_response(logits)
    if score == SCORE_COMBINED:
        if selection_logit is None:
            g = np.clip(np.asarray(selection, dtype=np.float64).reshape(-1), 0.0, 1.0)
        else:
            g = sigmoid(np.asarray(selection_logit).reshape(-1))
        return np.sqrt(g * softmax_response(logits))
    if score == SCORE_MARGIN:
        return top_two_margin(softmax(logits))
    if score == SCORE_GINI:
        p = softmax(logits)
        return (p * p).sum(axis=1)
    raise ValueError(f"score should be one of {', '.join(SCORE_NAMES)}, but got {score!r}")


def _check_pair(scores: np.ndarray, errors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate and flatten ``scores [N]`` (finite) and ``errors [N]`` (in [0, 1]) as float64."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    errors = np.asarray(errors, dtype=np.float64).reshape(-1)
    if scores.shape != errors.shape:
        raise ValueError(
            f"scores and errors should have the same length, but got {scores.size} and {errors.size}"
        )
    if scores.size == 0:
        raise ValueError("scores should hold at least one sample, but got none")
    # NaN scores would sort arbitrarily and silently corrupt every threshold
    if not np.isfinite(scores).all():
        raise ValueError("scores should be finite, but got NaN or Inf")
    if not ((errors >= 0.0) & (errors <= 1.0)).all():
        raise ValueError("errors should be 0/1 losses (values in [0, 1]), but got values outside [0, 1]")
    return scores, errors


def _sorted_desc(scores: np.ndarray, errors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scores in descending order and the errors in the same order (stable for ties)."""
    # argsort of the negation, not [::-1], so that equal scores keep input order
    order = np.argsort(-scores, kind="stable")
    return scores[order], errors[order]


def _tie_expected_errors(s: np.ndarray, e: np.ndarray) -> np.ndarray:
    """Each error of a descending-sorted sample replaced by its tie group's mean error.

    This is the expectation over random tie-breaking, so metrics built on it do not depend
    on the sort order of tied scores.
    """
    group_start = np.r_[True, s[1:] != s[:-1]]
    group_id = np.cumsum(group_start) - 1
    group_mean = np.bincount(group_id, weights=e) / np.bincount(group_id)
    return group_mean[group_id]


def selection_counts(scores: np.ndarray, errors: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Counts behind the risk–coverage curve at every distinct threshold.

    Returns ``(thresholds, n_selected, n_errors)``, each ``[U]`` for the ``U`` distinct scores
    in descending order: the selector ``scores >= thresholds[j]`` answers ``n_selected[j]``
    samples (int64, increasing) of which ``n_errors[j]`` are wrong. Tied scores enter together.
    """
    scores, errors = _check_pair(scores, errors)
    s, e = _sorted_desc(scores, errors)
    cum_err = np.cumsum(e)
    last = np.flatnonzero(np.r_[s[1:] != s[:-1], True])  # last index of each tie run
    return s[last], (last + 1).astype(np.int64), cum_err[last]


def coverage_and_risk(
    scores: np.ndarray, errors: np.ndarray, threshold: float | np.ndarray
) -> tuple[float, float, int]:
    """``(coverage, selective risk, n_selected)`` of the selector ``scores >= threshold``
    (``threshold`` a number, or ``[N]``, one per sample).

    The selective risk of an empty selection is undefined and returned as NaN.
    """
    scores, errors = _check_pair(scores, errors)
    selected = scores >= threshold
    n_sel = int(selected.sum())
    risk = float(errors[selected].sum() / n_sel) if n_sel else float("nan")
    return n_sel / scores.size, risk, n_sel


def risk_coverage_curve(scores: np.ndarray, errors: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The empirical risk–coverage curve at every distinct threshold.

    Returns ``(coverages, risks, thresholds)``, each ``[U]`` for the ``U`` distinct scores in
    descending order: the selector ``scores >= thresholds[j]`` has coverage ``coverages[j]``
    and selective risk ``risks[j]``. Tied scores enter together (a threshold cannot split them).
    """
    thresholds, n_sel, n_err = selection_counts(scores, errors)
    return n_sel / n_sel[-1], n_err / n_sel, thresholds


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
    s, e = _sorted_desc(scores, errors)
    cut = s[m - 1]
    above = s > cut
    tied = s == cut
    n_above = int(above.sum())
    err = e[above].sum() + (m - n_above) * e[tied].mean()
    return float(err / m)


def risk_at_coverages(
    scores: np.ndarray, errors: np.ndarray, coverages: tuple[str, ...] = TABLE_COVERAGES
) -> dict[str, float]:
    """``{coverage string: risk}`` for the paper's table coverages (keys as in ``TABLE_COVERAGES``)."""
    return {c: risk_at_coverage(scores, errors, float(c)) for c in coverages}


def aurc(scores: np.ndarray, errors: np.ndarray) -> float:
    """Area under the risk–coverage curve: mean over m = 1..N of the risk of the top-m samples.

    ``AURC = (1/N) Σ_m (errors among the m highest scores) / m`` (Geifman, Uziel & El-Yaniv,
    "Bias-reduced uncertainty estimation for deep neural classifiers", ICLR 2019).
    Ties are resolved in expectation (each tied group contributes its mean error), so the
    value does not depend on sort order. Lower is better; a perfect ranking of e errors in
    N samples gives the E-AURC baseline (see ``eaurc``).
    """
    scores, errors = _check_pair(scores, errors)
    s, e = _sorted_desc(scores, errors)
    m = np.arange(1, s.size + 1)
    return float(np.mean(np.cumsum(_tie_expected_errors(s, e)) / m))


def optimal_aurc(n: int, n_errors: float) -> float:
    """AURC of a perfect ranking (all correct samples first) of ``n`` samples with ``n_errors`` wrong.

    ``AURC* = (1/n) Σ_{m = n-e+1}^{n} (m - (n - e)) / m`` — the discrete form of Geifman et
    al.'s ``r + (1 - r) ln(1 - r)``, matching :func:`aurc`'s discretisation exactly.
    """
    if n < 1:
        raise ValueError(f"n should be at least 1, but got {n}")
    if not 0 <= n_errors <= n:
        raise ValueError(f"n_errors should be in [0, n={n}], but got {n_errors}")
    n_correct = n - n_errors
    m = np.arange(1, n + 1, dtype=np.float64)
    return float(np.mean(np.maximum(m - n_correct, 0.0) / m))


def eaurc(scores: np.ndarray, errors: np.ndarray) -> float:
    """Excess AURC: ``aurc - optimal_aurc`` (Geifman et al., ICLR 2019); 0 for a perfect ranking.

    Removes the part of AURC that only reflects the classifier's accuracy, leaving the
    quality of the ranking. Always ``>= 0`` (up to rounding).
    """
    scores, errors = _check_pair(scores, errors)
    return aurc(scores, errors) - optimal_aurc(scores.size, float(errors.sum()))


def augrc(scores: np.ndarray, errors: np.ndarray) -> float:
    """Area under the *generalized* risk–coverage curve (Traub et al., NeurIPS 2024,
    "Overcoming common flaws in the evaluation of selective classification systems").

    The generalized risk at coverage m/N is the fraction of *all* N samples that are both
    answered and wrong: ``(errors among the top m) / N``. With the same discretisation as
    :func:`aurc`: ``AUGRC = (1/N) Σ_{m=1..N} (errors among top m) / N``, ties in expectation.
    A random ranking gives about ``r / 2`` for error rate ``r``, a perfect one about ``r² / 2``.
    """
    scores, errors = _check_pair(scores, errors)
    s, e = _sorted_desc(scores, errors)
    return float(np.mean(np.cumsum(_tie_expected_errors(s, e)) / s.size))
