"""Class-conditional operating points (``abstain calibrate --per-class``): a threshold per predicted class.

A global threshold keeps its promise on average over the classes: a coverage point answers
``c`` of all inputs, perhaps 99 % of the easy classes and 60 % of a hard one; a risk point's
errors may all fall on one class. A class-conditional point applies the same rule to each
predicted class ``k`` on its own — the calibration samples the model predicts as ``k`` —
Mondrian by predicted class (Vovk, Gammerman & Shafer 2005, section 4.5), so that

* ``coverage-c``: each class's answered share of its predicted samples is at least ``c`` on the
  calibration data (the largest threshold that does so, :func:`abstain.thresholds.coverage_point`);
* ``risk-r``: for each class, ``P(selective risk of the answers predicting k > r) <= δ``,
  certified by the point's method (LTT or SGR) on that class's samples at ``δ`` (the score
  choice's share included). Each class's promise holds on its own; all ``K`` together hold with
  probability at least ``1 - K·δ`` (union bound) — give ``--delta δ/K`` for a joint guarantee.

The service, ``abstain predict``, ``evaluate`` and the selective graph decide a sample with its
predicted class's threshold (:func:`abstain.decisions.class_thresholds`). A class with fewer than
:data:`MIN_CLASS_SAMPLES` calibration samples predicted as it, or whose risk target cannot be
certified, gets no answer region — its threshold is ``null`` and every image predicted as it is
abstained on — and the command says so.

Written as one operating point named ``<method>-<target>-per-class``: ``class_thresholds``
(``[K]``, ``null`` where never answered), ``per_class`` (each class's samples, threshold,
coverage, risk and certificate), and ``threshold``, the lowest class threshold (nothing scoring
below it is ever answered), which the score histograms use as a bucket edge; ``coverage`` and
``risk`` are measured on all the calibration data with the per-class thresholds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from abstain.bounds import clopper_pearson
from abstain.operating_points import OperatingPoint
from abstain.thresholds import LTT_START_RULE, RankedScores, coverage_point, ltt_point, sgr_point

#: Fewer calibration samples predicted as a class than this leave the class without an answer
#: region at a coverage point: a coverage measured on fewer says too little (its 95 % interval is
#: wider than ±0.2 at 20).
MIN_CLASS_SAMPLES = 20
PER_CLASS_SUFFIX = "-per-class"


def _class_entry(k: int, n: int) -> dict[str, Any]:
    return {"class_index": k, "n": n, "threshold": None, "coverage": 0.0 if n else None, "risk": None}


def per_class_point(
    *,
    method: str,
    target: float,
    scores: np.ndarray,
    errors: np.ndarray,
    predicted: np.ndarray,
    num_classes: int,
    delta: float,
    delta_per_score: float,
    score: str,
    scale: str,
    risk_method: str,
    p_value: str,
) -> tuple[OperatingPoint | None, list[str]]:
    """One class-conditional point, and a line per class left without an answer region.

    Args:
        method: ``coverage`` or ``risk``; ``target`` its target.
        scores, errors, predicted: ``[N]`` the chosen score, 0/1 errors and arg-max class of each
            calibration sample.
        delta_per_score: each class's certificate level (``delta``, or its share when the score
            was chosen on this data).

    Returns ``(None, notes)`` when no class could be given a threshold.
    """
    thresholds: list[float | None] = []
    per_class: list[dict[str, Any]] = []
    notes: list[str] = []
    for k in range(num_classes):
        mine = predicted == k
        n_k = int(mine.sum())
        entry = _class_entry(k, n_k)
        if method == "coverage" and n_k < MIN_CLASS_SAMPLES:
            notes.append(
                f"class {k}: {n_k} calibration samples predicted as it, fewer than "
                f"{MIN_CLASS_SAMPLES}: never answered"
            )
        elif n_k:
            ranked = RankedScores.from_arrays(scores[mine], errors[mine])
            if method == "coverage":
                res = coverage_point(ranked, target, 1.0 - delta)
                entry.update(threshold=res.threshold, coverage=res.coverage, risk=res.risk)
            elif risk_method == "ltt":
                ltt = ltt_point(ranked, target, delta_per_score, p_value)
                entry.update(threshold=ltt.threshold, coverage=ltt.coverage or 0.0, risk=ltt.risk)
                entry.update(p_value=ltt.p_value, start_min_selected=ltt.start_min_selected)
                entry["samples_needed"] = ltt.samples_needed
            else:
                sgr = sgr_point(ranked, target, delta_per_score)
                entry.update(threshold=sgr.threshold, coverage=sgr.coverage or 0.0, risk=sgr.risk)
                entry.update(risk_bound=sgr.risk_bound, samples_needed=sgr.samples_needed)
            if entry["threshold"] is None:
                needed = entry.get("samples_needed")
                notes.append(
                    f"class {k}: {n_k} calibration samples predicted as it do not certify risk <= "
                    f"{target:g} at confidence {1.0 - delta_per_score:.4g}"
                    + (f" (at least {needed} answered would be needed)" if needed else "")
                    + ": never answered"
                )
        else:
            notes.append(f"class {k}: no calibration sample predicted as it: never answered")
        thresholds.append(entry["threshold"])
        per_class.append(entry)
    finite = [t for t in thresholds if t is not None]
    if not finite:
        return None, notes
    return _point(method, target, scores, errors, predicted, thresholds, per_class, delta, delta_per_score,
                  score, scale, risk_method, p_value), notes  # fmt: skip


def _point(
    method: str,
    target: float,
    scores: np.ndarray,
    errors: np.ndarray,
    predicted: np.ndarray,
    thresholds: Sequence[float | None],
    per_class: list[dict[str, Any]],
    delta: float,
    delta_per_score: float,
    score: str,
    scale: str,
    risk_method: str,
    p_value: str,
) -> OperatingPoint:
    """The point, measured on all the calibration data with each sample's class threshold."""
    held_to = np.array([np.inf if t is None else t for t in thresholds], dtype=np.float64)[predicted]
    answered = scores >= held_to
    n, n_sel = scores.shape[0], int(answered.sum())
    n_err = int(errors[answered].sum())
    confidence = 1.0 - delta
    extra: dict[str, Any] = {
        "score_scale": scale,
        "per_class": per_class,
        "class_thresholds": list(thresholds),
        "n_selected": n_sel,
        "n_errors": n_err,
        "coverage_interval": list(clopper_pearson(n_sel, n, confidence)),
        "risk_interval": list(clopper_pearson(n_err, n_sel, confidence)) if n_sel else [0.0, 1.0],
        "confidence": confidence,
    }
    if method == "risk":
        extra.update(risk_method=risk_method, delta_per_score=delta_per_score)
        if risk_method == "ltt":
            extra.update(p_value_method=p_value, start_rule=LTT_START_RULE)
    return OperatingPoint(
        name=f"{method}-{target:g}{PER_CLASS_SUFFIX}",
        method=method,
        score=score,
        threshold=min(t for t in thresholds if t is not None),
        target_coverage=target if method == "coverage" else None,
        target_risk=target if method == "risk" else None,
        delta=delta,
        coverage=n_sel / n,
        risk=n_err / n_sel if n_sel else 0.0,
        extra=extra,
    )
