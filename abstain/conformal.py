"""Conformal prediction sets for abstentions: "one of {3, 5, 8}" with a coverage guarantee (numpy only).

An abstention reports the model's top class as its ``candidate``; a reviewer is better served by
a *set* of classes that holds the true one with probability at least ``1 - alpha``. Split
conformal prediction (Vovk, Gammerman & Shafer, "Algorithmic Learning in a Random World", 2005;
Angelopoulos & Bates, "A Gentle Introduction to Conformal Prediction", 2021, section 1) builds it
from labelled calibration data and a *nonconformity score* ``s(x, y)`` (large = y is unlikely):

* ``lac`` — least ambiguous set-valued classifier (Sadinle, Lei & Wasserman, JASA 2019):
  ``s = 1 - p_y``; the set is ``{k : 1 - p_k <= q}``. The smallest sets on average.
* ``aps`` — adaptive prediction sets (Romano, Sesia & Candès, NeurIPS 2020), not randomised:
  ``s`` = the softmax mass of the classes at least as probable as ``y``, ``y`` included (ties
  broken by class index); the set is every class whose own such mass is ``<= q``. Larger sets
  where the model is unsure, smaller where it is sure.

``q`` is the ``⌈(n + 1)(1 - alpha)⌉``-th smallest of the ``n`` calibration scores
(:func:`conformal_quantile`); then, for a test sample exchangeable with the calibration
samples, ``P(y ∈ C(x)) >= 1 - alpha`` — on average over calibration draws, with no ``delta``
to split: it is a statement about the next sample, not a high-probability bound. With too few
samples (``n < (1 - alpha) / alpha``) no finite ``q`` keeps the promise and the set is every
class (``q = None``).

The guarantee a reviewer needs is about *abstentions*, which are the hard inputs: a set
calibrated on every sample keeps its promise over all inputs, not over abstentions — LAC's then
misses the label of abstentions more often than ``alpha``, APS's covers them with larger sets
than needed (both measured in the tests). So the calibration
(``abstain calibrate``) fits ``q`` per operating point on the calibration samples that point
abstains on — Mondrian conformal prediction with the taxonomy "abstained / answered" (Vovk et
al. 2005, section 4.5), which makes the promise ``P(y ∈ C(x) | abstained) >= 1 - alpha``. It is
exact when the threshold does not depend on the data ``q`` is fitted on; here the same data fit
both, and the Monte-Carlo tests (``tests/abstain/test_conformal.py``) measure what that costs.
A set may be empty (LAC, on an input whose every class is improbable): an honest answer that
the input is unlike the calibration data.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import numpy as np

SetMethod = Literal["lac", "aps"]
SET_METHODS: tuple[SetMethod, ...] = get_args(SetMethod)
#: The default miscoverage: sets hold the true class of 90 % of abstentions.
DEFAULT_SET_ALPHA = 0.1


def _check_method(method: str) -> None:
    if method not in SET_METHODS:
        raise ValueError(f"prediction-set method should be one of {SET_METHODS}, but got {method!r}")


def _check_alpha(alpha: float) -> float:
    if not 0.0 < float(alpha) < 1.0:
        raise ValueError(f"alpha should be in (0, 1) (the allowed miscoverage), but got {alpha!r}")
    return float(alpha)


def cumulative_mass(probs: np.ndarray) -> np.ndarray:
    """APS's per-class score: for each class, the mass of the classes at least as probable.

    Args:
        probs: float ``[N, K]`` softmax probabilities.

    Returns:
        float64 ``[N, K]``: entry ``[i, k]`` is the sum of ``probs[i, j]`` over the classes ``j``
        ranked at or before ``k`` (descending probability; equal ones by class index).
    """
    probs = np.asarray(probs, dtype=np.float64)
    order = np.argsort(-probs, axis=1, kind="stable")  # [N, K], most probable first
    ranked_cumsum = np.cumsum(np.take_along_axis(probs, order, axis=1), axis=1)
    out = np.empty_like(probs)
    np.put_along_axis(out, order, ranked_cumsum, axis=1)
    return out


def nonconformity(probs: np.ndarray, labels: np.ndarray, method: str) -> np.ndarray:
    """The score ``s(x_i, y_i)`` of each labelled sample, float64 ``[N]`` (large = ``y_i`` unlikely).

    Computed with the very expressions :func:`prediction_sets` compares, so that ``y`` is in the
    set exactly when its score is at most ``q``.
    """
    _check_method(method)
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if probs.ndim != 2 or probs.shape[0] != labels.shape[0]:
        raise ValueError(
            f"probs should be [N, K] and labels [N], but got {list(probs.shape)}, {list(labels.shape)}"
        )
    rows = np.arange(labels.shape[0])
    if method == "lac":
        return np.asarray(1.0 - probs[rows, labels])
    return np.asarray(cumulative_mass(probs)[rows, labels])


def conformal_quantile(scores: np.ndarray, alpha: float) -> float | None:
    """The ``⌈(n + 1)(1 - alpha)⌉``-th smallest of ``scores``; ``None`` when that rank exceeds ``n``.

    ``None`` means no finite quantile keeps the promise (too few samples): the set is every class.
    Worked example: ``alpha = 0.1`` and ``n = 19`` scores give rank ``⌈20 · 0.9⌉ = 18``.
    """
    alpha = _check_alpha(alpha)
    values = np.sort(np.asarray(scores, dtype=np.float64).reshape(-1))
    rank = min_rank(values.shape[0], alpha)
    return None if rank > values.shape[0] else float(values[rank - 1])


def min_rank(n: int, alpha: float) -> int:
    """``⌈(n + 1)(1 - alpha)⌉``, the 1-based rank of the conformal quantile among ``n`` scores."""
    # the small slack keeps an exact integer product (n + 1)(1 - alpha) from rounding up
    return max(1, math.ceil((n + 1) * (1.0 - alpha) - 1e-9))


def min_samples(alpha: float) -> int:
    """The fewest calibration samples with a finite quantile at ``alpha`` (9 at 0.1, 19 at 0.05)."""
    alpha = _check_alpha(alpha)
    n = 1
    while min_rank(n, alpha) > n:
        n += 1
    return n


def prediction_sets(probs: np.ndarray, quantile: float | None, method: str) -> np.ndarray:
    """Which classes each sample's set holds: bool ``[N, K]``.

    Args:
        probs: float ``[N, K]`` softmax probabilities.
        quantile: :func:`conformal_quantile` of the calibration scores; ``None``: every class.
        method: ``"lac"`` or ``"aps"`` (the module docstring).
    """
    _check_method(method)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2:
        raise ValueError(f"probs should be [N, K], but got {list(probs.shape)}")
    if quantile is None:
        return np.ones(probs.shape, dtype=bool)
    if method == "lac":
        return np.asarray(1.0 - probs <= quantile)
    return np.asarray(cumulative_mass(probs) <= quantile)
