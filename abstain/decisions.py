"""Graph outputs + an operating point → predict-or-abstain, as arrays (numpy only).

The one definition of the decision, shared by the service (``abstain.serving.http.answers``
turns it into JSON answers) and by offline batch prediction (``abstain predict``), so the two
cannot drift apart: a sample is answered iff ``score >= threshold``
(:mod:`abstain.operating_points`), with the score named by the operating point
(:func:`abstain.risk_coverage.selection_scores`: SelectiveNet's selection head g, Geifman &
El-Yaniv ICML 2019; the softmax response; or their geometric mean). The candidate class is
the arg-max of the prediction head f, and its softmax probability is the ``confidence``,
reported for abstentions too so that a reviewer sees the model's top candidate, with the
conformal prediction set of the operating point (:mod:`abstain.conformal`) when its calibration
has one; and, with a calibration temperature, each answer's calibrated confidence
(:mod:`abstain.temperature`), which the live-risk estimate averages.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

from abstain.conformal import prediction_sets
from abstain.operating_points import OperatingPoint
from abstain.risk_coverage import selection_scores, softmax
from abstain.temperature import calibrated_confidence

#: The two outcomes of a decision, as answers, the decision store and metrics name them.
DecisionLabel = Literal["predict", "abstain"]
PREDICT: DecisionLabel = "predict"
ABSTAIN: DecisionLabel = "abstain"
DECISION_LABELS: tuple[DecisionLabel, ...] = get_args(DecisionLabel)


@dataclass(frozen=True)
class Decisions:
    """Decisions for ``N`` samples at one operating point.

    Attributes:
        answered: bool ``[N]``, ``score_value >= threshold`` (or the decision given to
            :func:`decide_arrays`, taken where ``score_value`` was).
        class_index: int64 ``[N]``, arg-max of the logits (the prediction, or the candidate).
        confidence: float64 ``[N]``, softmax probability of ``class_index``.
        selection: float64 ``[N]``, the selection head's output g.
        score_value: float64 ``[N]``, the score the operating point thresholds, on its
            threshold's scale (a logit for ``selection`` on a graph with ``selection_logit``).
        point: the operating point that decided.
        prediction_set: bool ``[N, K]``, the classes of each sample's conformal set at the
            point's level (``point.extra["prediction_set"]``); ``None`` when it has none.
        calibrated_confidence: float64 ``[N]``, the temperature-scaled softmax probability of
            ``class_index``; ``None`` without a temperature.
        thresholds: float64 ``[N]``, the threshold each sample was held to: the point's, or, for
            a class-conditional point, its predicted class's (``inf``: a class never answered).
    """

    answered: np.ndarray
    class_index: np.ndarray
    confidence: np.ndarray
    selection: np.ndarray
    score_value: np.ndarray
    point: OperatingPoint
    prediction_set: np.ndarray | None = None
    calibrated_confidence: np.ndarray | None = None
    thresholds: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.answered.shape[0])

    def threshold(self, i: int) -> float | None:
        """The threshold sample ``i`` was held to; ``None`` for a class that is never answered."""
        if self.thresholds is None:
            return float(self.point.threshold)
        value = float(self.thresholds[i])
        return None if math.isinf(value) else value

    def reason(self, i: int) -> str:
        """Why sample ``i`` was abstained on, in words (for the JSON answer and offline records)."""
        if self.thresholds is None:
            return (
                f"{self.point.score} score {self.score_value[i]:.4f} below threshold "
                f"{self.point.threshold:.4f} of operating point {self.point.name}"
            )
        k, threshold = int(self.class_index[i]), self.threshold(i)
        if threshold is None:
            return (
                f"operating point {self.point.name} never answers class {k}: its calibration had "
                "too few samples of that class to certify a threshold"
            )
        return (
            f"{self.point.score} score {self.score_value[i]:.4f} below class {k}'s threshold "
            f"{threshold:.4f} of operating point {self.point.name}"
        )


def class_thresholds(point: OperatingPoint) -> np.ndarray | None:
    """A class-conditional point's thresholds, float64 ``[K]`` (``inf`` for a class it never
    answers: ``null`` in ``calibration.json``); ``None`` for a point with one threshold."""
    values = point.extra.get("class_thresholds")
    if values is None:
        return None
    return np.array([math.inf if t is None else t for t in values], dtype=np.float64)


def decide_arrays(
    logits: np.ndarray,
    selection: np.ndarray,
    point: OperatingPoint,
    selection_logit: np.ndarray | None = None,
    *,
    score_value: np.ndarray | None = None,
    answered: np.ndarray | None = None,
    temperature: float | None = None,
) -> Decisions:
    """Decide every row of ``logits``.

    Args:
        logits: float ``[N, K]`` prediction-head outputs.
        selection: float ``[N]`` (or ``[N, 1]``) selection-head outputs g in [0, 1].
        point: the operating point whose ``score`` and ``threshold`` decide.
        selection_logit: float ``[N]`` g's logit z when the graph exports it; the
            ``selection`` score is then z, and ``score_value`` and the threshold are logits.
        score_value: float ``[N]``, ``point``'s score already computed where the decision is
            taken (a selective graph's ``scores`` column, ``serving/triton/selective_backend.py``),
            on the threshold's scale: used as is instead of being recomputed here, so that the
            reported ``score_value`` is the number the threshold was compared with.
        answered: bool ``[N]``, the decision already taken (a selective graph's ``accept``
            column); default ``score_value >= threshold``. Given with ``score_value``, the two
            must agree.
        temperature: the calibration's softmax temperature; given, the decisions carry each
            sample's :attr:`Decisions.calibrated_confidence`.

    Raises:
        ValueError: ``logits`` is not ``[N, K]``, ``selection``, ``score_value`` or ``answered``
            has not ``N`` values, or ``answered`` is not ``score_value >= threshold``.
    """
    # float64: the threshold was fitted in float64 on the same scores (abstain.thresholds), so
    # a sample exactly at the threshold is answered here as it was counted at calibration.
    logits = np.asarray(logits, dtype=np.float64)
    selection = np.asarray(selection, dtype=np.float64).reshape(-1)
    if logits.ndim != 2 or logits.shape[0] != selection.shape[0]:
        raise ValueError(
            f"logits should be [N, K] and selection [N], but got {list(logits.shape)} "
            f"and {list(selection.shape)}"
        )
    probs = softmax(logits)  # [N, K]
    top = probs.argmax(axis=1)  # [N]
    confidence = probs[np.arange(top.shape[0]), top]  # [N], the softmax response
    n = selection.shape[0]
    if score_value is None:
        scores = selection_scores(logits, selection, point.score, selection_logit)  # [N]
    else:
        scores = _column(score_value, np.float64, n, "score_value")
    per_class = class_thresholds(point)
    if per_class is not None and per_class.shape[0] != logits.shape[1]:
        raise ValueError(
            f"operating point {point.name} has {per_class.shape[0]} class thresholds, but the "
            f"logits have {logits.shape[1]} classes"
        )
    # a class-conditional point holds each sample to its predicted class's threshold
    thresholds = None if per_class is None else per_class[top]
    decided = scores >= (point.threshold if thresholds is None else thresholds)
    if answered is not None:
        answered = _column(answered, bool, n, "answered")
        if score_value is not None and not np.array_equal(answered, decided):
            i = int(np.flatnonzero(answered != decided)[0])
            held_to = point.threshold if thresholds is None else float(thresholds[i])
            raise ValueError(
                f"answered[{i}] = {bool(answered[i])} but score_value[{i}] = {float(scores[i])!r} "
                f"{'>=' if decided[i] else '<'} threshold {held_to!r} of operating point "
                f"{point.name}: the decision and its score should come from the same place"
            )
        decided = answered
    conformal = point.extra.get("prediction_set")
    return Decisions(
        answered=decided,
        class_index=top.astype(np.int64),
        confidence=confidence,
        selection=selection,
        score_value=scores,
        point=point,
        prediction_set=None
        if conformal is None
        else prediction_sets(probs, conformal.get("quantile"), conformal["method"]),
        calibrated_confidence=None if temperature is None else calibrated_confidence(logits, temperature),
        thresholds=thresholds,
    )


def _column(values: np.ndarray, dtype: type, n: int, name: str) -> np.ndarray:
    """``values`` as a ``dtype`` ``[n]`` array; ``ValueError`` unless it holds ``n`` values."""
    column: np.ndarray = np.asarray(values, dtype=dtype).reshape(-1)
    if column.shape[0] != n:
        raise ValueError(f"{name} should have {n} values, one per row of logits, but got {column.shape[0]}")
    return column
