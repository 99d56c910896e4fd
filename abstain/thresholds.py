"""Operating points: the threshold for a target coverage, and for a target risk with a guarantee.

Conventions as in :mod:`abstain.risk_coverage`: a sample is answered iff ``score >= threshold``;
``errors`` are 0/1. Both functions take a :class:`RankedScores` (one sort of the data), so
several operating points over a million scores cost one ``argsort``.

* :func:`coverage_point` — SelectiveNet's post-training calibration (Geifman & El-Yaniv,
  ICML 2019): on held-out data, the threshold whose empirical coverage is the target, with
  Clopper–Pearson intervals for the coverage and for the selective risk.
* :func:`sgr_point` — Selection with Guaranteed Risk (Geifman & El-Yaniv, NeurIPS 2017,
  Algorithm 1): binary search over the sorted thresholds for the largest coverage whose
  exact binomial upper bound on the selective risk is ``<= target``, with ``δ`` split evenly
  over the probes (a union bound), so the returned risk bound holds with probability
  ``>= 1 - δ``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from abstain.bounds import binomial_upper_bound, clopper_pearson, samples_needed_for_zero_errors
from abstain.risk_coverage import selection_counts


@dataclass(frozen=True)
class RankedScores:
    """The data of a risk–coverage curve at every distinct threshold (descending).

    Attributes:
        thresholds: float64 ``[U]`` distinct scores, descending.
        n_selected: int64 ``[U]`` samples with ``score >= thresholds[j]`` (increasing to ``n``).
        n_errors: int64 ``[U]`` wrong answers among them.
        n: number of samples.
    """

    thresholds: np.ndarray
    n_selected: np.ndarray
    n_errors: np.ndarray
    n: int

    @classmethod
    def from_arrays(cls, scores: np.ndarray, errors: np.ndarray) -> RankedScores:
        """Sort once: ``scores [N]`` finite, ``errors [N]`` of 0/1."""
        errors = np.asarray(errors)
        if not np.isin(errors, (0, 1)).all():
            raise ValueError("errors should be 0/1 (1 = wrong prediction), but got other values")
        thresholds, n_sel, n_err = selection_counts(scores, errors)
        return cls(thresholds, n_sel, np.rint(n_err).astype(np.int64), int(n_sel[-1]))


@dataclass(frozen=True)
class CoverageResult:
    """A coverage operating point measured on the calibration data.

    ``coverage >= target_coverage`` always; it is larger only when tied scores straddle the
    cut (a threshold cannot split a tie). ``risk`` is the selective risk of the answered
    ``n_selected`` samples; the intervals are two-sided Clopper–Pearson at ``confidence``.
    """

    target_coverage: float
    threshold: float
    coverage: float
    coverage_interval: tuple[float, float]
    risk: float
    risk_interval: tuple[float, float]
    n_selected: int
    n_errors: int
    confidence: float


@dataclass(frozen=True)
class RiskResult:
    """The outcome of SGR for one target risk.

    When ``feasible`` is False no threshold met the target with this data: ``threshold``,
    ``coverage``, ``risk`` and ``risk_bound`` are None and ``samples_needed`` is the smallest
    number of *selected* samples that could certify the target even with zero errors among
    them (at the same per-probe ``δ``); more data, or a better model, is needed.
    """

    target_risk: float
    delta: float
    feasible: bool
    threshold: float | None
    coverage: float | None
    risk: float | None
    risk_bound: float | None
    n_selected: int
    n_errors: int
    n_probes: int
    delta_per_probe: float
    samples_needed: int | None = None
    best_bound: float | None = None  # the lowest bound any probe reached (for the message)
    probes: list[dict[str, float]] = field(default_factory=list)


def _check_target(value: float, name: str) -> float:
    value = float(value)
    if not 0.0 < value <= 1.0 or math.isnan(value):
        raise ValueError(f"{name} should be in (0, 1], but got {value!r}")
    return value


def coverage_point(ranked: RankedScores, target_coverage: float, confidence: float = 0.95) -> CoverageResult:
    """The largest threshold whose empirical coverage is at least ``target_coverage``.

    It answers the ``m = ceil(target · n)`` highest-scoring samples (plus any tied with the
    m-th). Example: scores ``[.9, .8, .7, .6]``, target 0.5 → threshold 0.8, coverage 0.5.
    """
    target = _check_target(target_coverage, "target coverage")
    m = max(1, math.ceil(target * ranked.n - 1e-9))  # 1e-9: 0.9 * 10 must give 9, not 10
    j = int(np.searchsorted(ranked.n_selected, m, side="left"))
    n_sel, n_err = int(ranked.n_selected[j]), int(ranked.n_errors[j])
    return CoverageResult(
        target_coverage=target,
        threshold=float(ranked.thresholds[j]),
        coverage=n_sel / ranked.n,
        coverage_interval=clopper_pearson(n_sel, ranked.n, confidence),
        risk=n_err / n_sel,
        risk_interval=clopper_pearson(n_err, n_sel, confidence),
        n_selected=n_sel,
        n_errors=n_err,
        confidence=confidence,
    )


def probe_count(n: int) -> int:
    """SGR's probe budget for ``n`` samples: ``⌈log2 n⌉ + 1`` (``1`` for ``n = 1``).

    ``(n - 1).bit_length()`` is ``⌈log2 n⌉`` computed exactly in integers (``n = 8`` → 3,
    ``n = 9`` → 4), with no floating-point ``log2`` rounding at powers of two.
    """
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise ValueError(f"n (number of samples) should be a positive integer, but got {n!r}")
    return 1 + (int(n) - 1).bit_length()


def sgr_point(ranked: RankedScores, target_risk: float, delta: float = 0.05) -> RiskResult:
    """Selection with Guaranteed Risk: the largest coverage certified to have risk ``<= target``.

    Each probe of a threshold index ``j`` (thresholds descending, so coverage grows with
    ``j``) computes the exact binomial bound ``B*(n_errors[j], n_selected[j], δ / K)``.

    1. Probe full coverage (``j = U - 1``) first: when even answering everything is certified
       there is nothing to search, and a binary search, which assumes the bound grows with
       coverage, would walk away from it when the data has few errors.
    2. Otherwise binary-search the other ``U - 1`` thresholds (Geifman & El-Yaniv 2017,
       Algorithm 1), moving to larger coverage when the bound is ``<= target_risk``.

    ``δ`` is split over ``K = probe_count(n) = ⌈log2 n⌉ + 1`` probes (the paper's ``⌈log2 m⌉``
    for ``m = n`` samples, plus the full-coverage probe): a number fixed by the sample size
    alone. A binary search over the ``U - 1 <= n - 1`` distinct scores makes at most
    ``(U - 1).bit_length() <= ⌈log2 n⌉`` probes, so by the union bound all probed bounds hold
    together with probability ``>= 1 - δ`` and the best passing probe may be returned. (The
    paper returns the *last* probe, which can fail the target; keeping the best passing one
    gives the same guarantee without that failure.) Why not ``K`` from ``U``: the split would
    then depend on the data (on how many scores tie), and a guarantee whose ``δ`` is chosen by
    looking at the sample is not the guarantee the union bound proves.
    """
    target = _check_target(target_risk, "target risk")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta should be in (0, 1), but got {delta!r}")
    u = ranked.thresholds.size
    n_probes = probe_count(ranked.n)
    delta_step = delta / n_probes
    probes: list[dict[str, float]] = []
    bounds: dict[int, float] = {}

    def passes(j: int) -> bool:
        n_sel, n_err = int(ranked.n_selected[j]), int(ranked.n_errors[j])
        bounds[j] = binomial_upper_bound(n_err, n_sel, delta_step)
        probes.append(
            {
                "threshold": float(ranked.thresholds[j]),
                "n_selected": n_sel,
                "n_errors": n_err,
                "risk_bound": bounds[j],
            }
        )
        return bounds[j] <= target

    best = u - 1 if passes(u - 1) else -1
    lo, hi = 0, (u - 2 if best < 0 else -1)  # nothing left to search once full coverage passes
    while lo <= hi:
        mid = (lo + hi) // 2
        if passes(mid):
            best, lo = mid, mid + 1  # certified: try answering more
        else:
            hi = mid - 1
    if len(probes) > n_probes:  # cannot happen for a binary search; the δ split relies on it
        raise AssertionError(f"SGR made {len(probes)} probes but split δ over {n_probes}")
    best_bound = min(bounds.values())
    if best < 0:
        return RiskResult(
            target_risk=target,
            delta=delta,
            feasible=False,
            threshold=None,
            coverage=None,
            risk=None,
            risk_bound=None,
            n_selected=0,
            n_errors=0,
            n_probes=n_probes,
            delta_per_probe=delta_step,
            samples_needed=samples_needed_for_zero_errors(target, delta_step),
            best_bound=best_bound,
            probes=probes,
        )
    n_sel, n_err = int(ranked.n_selected[best]), int(ranked.n_errors[best])
    return RiskResult(
        target_risk=target,
        delta=delta,
        feasible=True,
        threshold=float(ranked.thresholds[best]),
        coverage=n_sel / ranked.n,
        risk=n_err / n_sel,
        risk_bound=bounds[best],
        n_selected=n_sel,
        n_errors=n_err,
        n_probes=n_probes,
        delta_per_probe=delta_step,
        best_bound=best_bound,
        probes=probes,
    )
