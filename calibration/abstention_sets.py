"""What ``abstain calibrate`` adds to each operating point beyond its threshold.

* A conformal prediction set for its abstentions (:mod:`abstain.conformal`): the quantile is
  fitted on the calibration samples *this point abstains on* (Mondrian by decision), so that a
  reviewer's set holds the true class of at least ``1 - alpha`` of abstentions, not of all inputs.
  It uses the same data as the threshold and no share of ``delta``: a conformal set's promise is
  an expectation over the next sample, not a high-probability bound (the module docstring of
  :mod:`abstain.conformal` says what fitting both on one sample costs, and the Monte-Carlo tests
  measure it).
* The label-free estimate of its selective risk (:mod:`abstain.temperature`) on the calibration
  data, beside the risk measured there, so an operator can see how far the live gauge's estimate
  is from the truth before trusting it.

The temperature is fitted on all the calibration data (every sample, answered or not: the
arg-max is unchanged by it, so it does not interact with any threshold).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from abstain.conformal import conformal_quantile, min_samples, nonconformity, prediction_sets
from abstain.decisions import decide_arrays
from abstain.operating_points import OperatingPoint
from abstain.risk_coverage import softmax
from abstain.runtime import GraphOutputs
from abstain.temperature import TemperatureFit, calibrated_confidence, estimated_risk, fit_temperature


@dataclasses.dataclass(frozen=True)
class SetSpec:
    """How the sets are made: ``method`` (``lac`` | ``aps``) at miscoverage ``alpha``."""

    method: str
    alpha: float


def abstention_set(
    outputs: GraphOutputs, labels: np.ndarray, point: OperatingPoint, spec: SetSpec
) -> dict[str, Any]:
    """The ``prediction_set`` entry of ``point``: its quantile and what it gives on this data.

    Returns ``{"method", "alpha", "quantile", "n_calibration", "coverage", "mean_size",
    "min_samples"}``; ``quantile`` is ``None`` (every class) with fewer than ``min_samples``
    abstentions; ``coverage`` and ``mean_size`` are over those abstentions (``None`` if none).
    """
    abstained = ~decide_arrays(outputs.logits, outputs.selection, point, outputs.selection_logit).answered
    probs = softmax(outputs.logits)[abstained]  # [n, K], float64 as the service computes them
    y = np.asarray(labels, dtype=np.int64)[abstained]
    quantile = conformal_quantile(nonconformity(probs, y, spec.method), spec.alpha)
    sets = prediction_sets(probs, quantile, spec.method)  # [n, K]
    n = int(abstained.sum())
    return {
        "method": spec.method,
        "alpha": spec.alpha,
        "quantile": quantile,
        "n_calibration": n,
        "min_samples": min_samples(spec.alpha),
        "coverage": float(sets[np.arange(n), y].mean()) if n else None,
        "mean_size": float(sets.sum(axis=1).mean()) if n else None,
    }


def with_sets_and_estimate(
    point: OperatingPoint,
    outputs: GraphOutputs,
    labels: np.ndarray,
    temperature: TemperatureFit,
    spec: SetSpec | None,
) -> OperatingPoint:
    """``point`` with ``prediction_set`` (unless ``spec`` is ``None``) and ``estimated_risk``."""
    answered = decide_arrays(outputs.logits, outputs.selection, point, outputs.selection_logit).answered
    extra = dict(point.extra)
    extra["estimated_risk"] = estimated_risk(
        calibrated_confidence(outputs.logits, temperature.temperature), answered
    )
    if spec is not None:
        extra["prediction_set"] = abstention_set(outputs, labels, point, spec)
    return dataclasses.replace(point, extra=extra)


def fit_confidence(outputs: GraphOutputs, labels: np.ndarray) -> TemperatureFit:
    """The softmax temperature of these outputs (:func:`abstain.temperature.fit_temperature`)."""
    return fit_temperature(outputs.logits, labels)
