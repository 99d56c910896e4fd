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
* :func:`ltt_point` — Learn then Test (Angelopoulos, Bates, Candès, Jordan, Lei 2021) with
  fixed-sequence testing: the thresholds from the most confident down, each tested at the
  whole ``δ``, stopping at the first that fails; the sequence starts where a rejection is
  possible at all (:func:`ltt_start_count`), so it cannot collapse to answering nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from abstain.bounds import (
    P_VALUES,
    PValue,
    binomial_upper_bound,
    clopper_pearson,
    samples_needed_for_zero_errors,
)
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


#: How :func:`ltt_point` picks the first threshold it tests (recorded in calibration.json).
LTT_START_RULE = "min_selected"


@dataclass(frozen=True)
class LttResult:
    """The outcome of fixed-sequence Learn then Test for one target risk.

    ``p_value`` is the p-value of the returned threshold (``<= delta``); every threshold of the
    sequence above it was rejected too. The sequence started at ``start_threshold``, the first
    (highest) threshold answering at least ``start_min_selected`` samples, and ``n_tested``
    thresholds were tested in all (the first non-rejection included). When ``feasible`` is
    False the start itself was not rejected (``start_p_value > delta``) or fewer than
    ``start_min_selected`` samples exist; ``samples_needed`` is then that count, the fewest
    answered samples that could certify the target even with zero errors among them.
    """

    target_risk: float
    delta: float
    p_value_method: str
    feasible: bool
    threshold: float | None
    coverage: float | None
    risk: float | None
    p_value: float | None
    n_selected: int
    n_errors: int
    start_min_selected: int
    start_threshold: float | None
    start_p_value: float | None
    n_tested: int
    samples_needed: int | None = None


def _p_value_function(p_value: str | PValue) -> tuple[PValue, str]:
    if callable(p_value):
        return p_value, getattr(p_value, "__name__", "custom")
    if p_value not in P_VALUES:
        raise ValueError(f"p_value should be one of {', '.join(P_VALUES)}, but got {p_value!r}")
    return P_VALUES[p_value], p_value


def ltt_start_count(target_risk: float, delta: float, p_value: str | PValue = "exact") -> int:
    """``m0``: the fewest answered samples whose test can reject ``risk > target`` at ``δ``.

    The smallest ``m`` with ``p(0 errors, m) <= δ``; with fewer answered samples no error count
    can be rejected (p-values grow with errors). For the exact and the Hoeffding–Bentkus
    p-values ``p(0, m) = (1 - r)^m``, so ``m0 = ⌈ln δ / ln(1 - r)⌉``
    (:func:`~abstain.bounds.samples_needed_for_zero_errors` at the whole ``δ``): 59 for
    ``r = 0.05, δ = 0.05``, 299 for ``r = 0.01``. A number fixed by ``r`` and ``δ`` alone,
    before any data is seen. Found by doubling then bisection on ``m`` (``p(0, m)`` does not
    grow with ``m``), so any p-value of that shape works.
    """
    target = _check_target(target_risk, "target risk")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta should be in (0, 1), but got {delta!r}")
    fn, _ = _p_value_function(p_value)
    hi = 1
    while fn(0, hi, target) > delta:
        hi *= 2
        if hi > 2**62:
            raise ValueError(f"no number of samples can reject risk > {target:g} at delta {delta:g}")
    lo = hi // 2  # fn(0, lo) > delta (or lo = 0)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fn(0, mid, target) <= delta:
            hi = mid
        else:
            lo = mid
    return hi


def ltt_point(
    ranked: RankedScores,
    target_risk: float,
    delta: float = 0.05,
    p_value: str | PValue = "exact",
    min_selected: int | None = None,
) -> LttResult:
    """Learn then Test, fixed sequence: the largest coverage whose threshold, and every threshold
    above it, rejects ``H_λ: R(λ) > r`` at level ``δ`` (``R`` the population selective risk).

    Angelopoulos, Bates, Candès, Jordan, Lei, "Learn then Test: Calibrating Predictive
    Algorithms to Achieve Risk Control" (2021), §3 with fixed-sequence testing (Bauer 1991).
    The thresholds ``ranked.thresholds`` (descending) are tested in that order with the p-value
    ``p(n_errors[j], n_selected[j], r)`` (:data:`~abstain.bounds.P_VALUES`: ``exact`` is
    ``P(Bin(n, r) <= k)``, ``hoeffding_bentkus`` the bounded-loss one), each at the whole
    ``δ``, starting at the first threshold answering at least ``m0`` samples; the procedure
    stops at the first p-value ``> δ`` and returns the last rejected threshold.

    Why the guarantee ``P(R(λ̂) > r) <= δ`` holds (continuous scores):

    1. *Each test is exact.* For a fixed threshold λ the answered samples are i.i.d. draws from
       the scores above λ, so given their number ``n`` the errors are ``Bin(n, R(λ))``, and
       under ``H_λ`` the p-value is super-uniform. Every real λ between two consecutive
       calibration scores answers the same samples, so testing the distinct calibration
       scores in descending order *is* fixed-sequence testing over all real thresholds in a
       fixed order (the highest first) — the order does not depend on the data.
    2. *Fixed sequence.* A wrong threshold is returned only if the first null of the sequence,
       ``λ* = max{λ : R(λ) > r}``, is rejected: the procedure stops at its first non-rejection,
       so it never reaches a later null otherwise. That has probability ``<= δ``.
    3. *The start (why the sequence does not begin at the top).* A threshold answering ``n <
       m0`` samples can never be rejected (:func:`ltt_start_count`: even 0 errors give ``p >
       δ``), so a sequence started at the top stops at once and answers nothing: the collapse
       issue 22 measured with MAPIE's grid from ``1 - 10⁻⁶``. The start skips those
       thresholds; ``m0`` is fixed by ``r`` and ``δ`` before the data is seen. Let ``N*`` be
       the number of samples above ``λ*``. If ``N* > m0`` the start is above ``λ*`` and 2.
       applies unchanged: probability ``<= δ · P(N* > m0)`` (given ``N*`` the errors above
       ``λ*`` are ``Bin(N*, R(λ*))``). If ``N* <= m0``, the ``(m0+1)``-th highest score ``t``
       is below ``λ*``, and an error needs the start's own test, of the top ``m0`` samples,
       to reject; given ``t`` those are i.i.d. draws from above ``t``, errors ``Bin(m0,
       R(t))``, and ``R(t) > r`` when (C) *thresholds below the first one whose risk exceeds
       r exceed it too* — lowering the threshold further never brings the risk back under
       ``r``. Probability ``<= δ · P(N* <= m0)``. The two cases add up to ``δ``: no ``δ`` is
       split. Without (C) the first case still holds: the guarantee can only be lost for a
       model whose top ``m0`` answers already exceed ``r`` and whose risk then falls below
       it again — one that a sequence from the top could not certify anything for either.
       (SGR needs no such condition; it pays with ``δ / K``.)

    ``min_selected`` overrides ``m0`` (the Monte-Carlo tests move the start; a start below
    ``m0`` tests a threshold that cannot be rejected and answers nothing). ``p_value`` may
    also be a function ``(n_errors, n_selected, target) -> p``, non-decreasing in
    ``n_errors`` and non-increasing in ``n_selected`` (both given ones are): a run of
    thresholds that adds no error then passes whenever its first one passes, so only the
    thresholds where the error count grows are computed — a few hundred for ``n = 5,000``.

    Example: scores ``[.9, .8, .7, .6]`` with errors ``[0, 0, 1, 1]`` (by descending score),
    ``r = 0.5, δ = 0.3``: ``m0 = 2`` (``0.5² <= 0.3``); the top 2 (0 errors) give ``p =
    0.25``, rejected; the top 3 (1 error) ``p = 1/2``, not: threshold 0.8, coverage 0.5.
    """
    target = _check_target(target_risk, "target risk")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta should be in (0, 1), but got {delta!r}")
    fn, name = _p_value_function(p_value)
    if min_selected is None:
        m0 = ltt_start_count(target, delta, fn)
    elif isinstance(min_selected, bool) or int(min_selected) != min_selected or min_selected < 1:
        raise ValueError(f"min_selected should be a positive integer, but got {min_selected!r}")
    else:
        m0 = int(min_selected)
    n_sel, n_err = ranked.n_selected, ranked.n_errors
    u = ranked.thresholds.size
    start = int(np.searchsorted(n_sel, m0, side="left"))  # first threshold answering >= m0

    def infeasible(start_threshold: float | None, start_p_value: float | None, n_tested: int) -> LttResult:
        return LttResult(
            target_risk=target,
            delta=delta,
            p_value_method=name,
            feasible=False,
            threshold=None,
            coverage=None,
            risk=None,
            p_value=None,
            n_selected=0,
            n_errors=0,
            start_min_selected=m0,
            start_threshold=start_threshold,
            start_p_value=start_p_value,
            n_tested=n_tested,
            samples_needed=m0,
        )

    if start == u:  # fewer than m0 samples in all: nothing can be certified
        return infeasible(None, None, 0)
    # p only grows where the error count does: test the start and each threshold adding an
    # error; the thresholds between two of those pass when the first of them passes
    grows = start + np.flatnonzero(np.diff(n_err[start:], prepend=-1) > 0)
    stop = u  # index of the first non-rejection (u: none)
    p_first: float | None = None
    for j in grows.tolist():
        p = fn(int(n_err[j]), int(n_sel[j]), target)
        if p_first is None:
            p_first = p
        if p > delta:
            stop = j
            break
    n_tested = stop - start + (1 if stop < u else 0)
    best = stop - 1
    start_threshold = float(ranked.thresholds[start])
    if best < start:
        return infeasible(start_threshold, p_first, n_tested)
    k, m = int(n_err[best]), int(n_sel[best])
    return LttResult(
        target_risk=target,
        delta=delta,
        p_value_method=name,
        start_min_selected=m0,
        feasible=True,
        threshold=float(ranked.thresholds[best]),
        coverage=m / ranked.n,
        risk=k / m,
        p_value=fn(k, m, target),
        n_selected=m,
        n_errors=k,
        start_threshold=start_threshold,
        start_p_value=p_first,
        n_tested=n_tested,
    )
