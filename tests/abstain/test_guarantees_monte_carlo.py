"""Monte-Carlo checks that the promises hold as often as they say, on synthetic scores.

Scores are uniform on [0, 1] (continuous, so no ties) and, for the risk bound, a sample with
score ``s`` is wrong with probability ``0.3 (1 - s)``: the population selective risk of the
threshold ``t`` is then ``∫_t^1 0.3 (1 - s) ds / (1 - t) = 0.15 (1 - t)``, known exactly.

Each check may fail with probability at most ``δ``; over ``T`` independent trials the observed
failure rate is allowed ``δ + 3 sqrt(δ (1 - δ) / T)`` (three binomial standard deviations),
and each test also shows that its trial design *can* see failures (the check it replaced, or a
selector without a bound, fails far more often), so a pass is not vacuous.
"""

from __future__ import annotations

import math

import numpy as np

from abstain.bounds import (
    binomial_cdf,
    binomial_tail_p_value,
    coverage_prediction_interval,
    risk_exceeds_target,
)
from abstain.thresholds import LttResult, RankedScores, coverage_point, ltt_point, sgr_point

DELTA = 0.1


def _allowed(trials: int) -> float:
    return DELTA + 3.0 * math.sqrt(DELTA * (1.0 - DELTA) / trials)


def test_coverage_prediction_interval_fails_at_most_delta_of_the_time() -> None:
    rng = np.random.default_rng(2026)
    n_cal, n_test, trials = 300, 300, 1000
    outside_prediction = outside_calibration_interval = 0
    for _ in range(trials):
        ranked = RankedScores.from_arrays(rng.random(n_cal), np.zeros(n_cal, dtype=np.int64))
        point = coverage_point(ranked, 0.9, confidence=1.0 - DELTA)
        lo, hi = coverage_prediction_interval(point.n_selected, n_cal, n_test, 1.0 - DELTA)
        coverage = float((rng.random(n_test) >= point.threshold).mean())
        outside_prediction += not lo <= coverage <= hi
        cp_lo, cp_hi = point.coverage_interval
        outside_calibration_interval += not cp_lo <= coverage <= cp_hi
    assert outside_prediction / trials <= _allowed(trials)
    # the interval is not needlessly wide either: the discrete tails use most of δ
    assert outside_prediction / trials >= DELTA / 3
    # the old check (test coverage inside calibration's Clopper–Pearson interval) ignores the
    # test sample's spread: about 2δ here, so this design does detect an over-eager check
    assert outside_calibration_interval / trials > _allowed(trials)


def test_sgr_risk_bound_fails_at_most_delta_of_the_time() -> None:
    rng = np.random.default_rng(7)
    n, trials, target = 1000, 200, 0.08
    sgr_failures = naive_failures = feasible = test_check_failures = 0
    for _ in range(trials):
        scores = rng.random(n)
        errors = (rng.random(n) < 0.3 * (1.0 - scores)).astype(np.int64)
        ranked = RankedScores.from_arrays(scores, errors)
        res = sgr_point(ranked, target, delta=DELTA)
        if res.feasible:
            feasible += 1
            sgr_failures += 0.15 * (1.0 - res.threshold) > target  # population risk above target
            # evaluate's check on a fresh test sample of the same size
            test_scores = rng.random(n)
            test_errors = rng.random(n) < 0.3 * (1.0 - test_scores)
            answered = test_scores >= res.threshold
            test_check_failures += bool(answered.any()) and risk_exceeds_target(
                int(test_errors[answered].sum()), int(answered.sum()), target, DELTA
            )
        # a selector without a bound: the largest coverage whose *empirical* risk is <= target
        ok = np.flatnonzero(ranked.n_errors <= target * ranked.n_selected)
        naive_failures += 0.15 * (1.0 - ranked.thresholds[ok[-1]]) > target
    assert feasible >= trials * 0.8  # the bound is reachable at this n: the test is not vacuous
    assert sgr_failures / trials <= _allowed(trials)
    # evaluate's risk check fails at most δ when SGR's promise holds (which fails at most δ)
    assert test_check_failures / trials <= _allowed(trials) + DELTA
    assert naive_failures / trials > 0.3  # the design sees a missing bound: it fails often


def _allowed_failures(trials: int, rate: float, tail: float = 1e-3) -> int:
    """The most failures a check that fails with probability ``<= rate`` shows in ``trials``
    independent trials, but for probability ``<= tail``: the smallest ``f`` with
    ``P(Bin(trials, rate) > f) <= tail`` (exact binomial, not a normal approximation)."""
    f = 0
    while 1.0 - binomial_cdf(f, trials, rate) > tail:
        f += 1
    return f


def _population_risk(threshold: float) -> float:
    """``R(t) = 0.15 (1 - t)`` for the module's synthetic scores (P(error | s) = 0.3 (1 - s))."""
    return 0.15 * (1.0 - threshold)


def test_ltt_fails_at_most_delta_of_the_time_wherever_it_starts() -> None:
    """LTT's promise, ``P(R(threshold) > r) <= δ``, on scores whose risk is known.

    ``R(t) = 0.15 (1 - t)`` grows as the threshold falls (condition C of ``ltt_point``), and
    exceeds r = 0.08 once more than 53.3 % is answered (533 of 1,000). Starts: the rule's
    ``m0`` (28 samples), 300 (well before the crossing), 540 (at it: null in about half the
    trials) and 700 (always past it: the start's own test must then fail). Each may fail at
    most ``δ`` of the time; two wrong p-values — a plain "empirical risk <= r" test and the
    exact p-value divided by 3 (a test at 3δ) — make the same check fail, so it can fail.
    """
    rng = np.random.default_rng(22)
    n, trials, target = 1000, 300, 0.08
    starts: tuple[int | None, ...] = (None, 300, 540, 700)

    def empirical(k: int, m: int, r: float) -> float:
        return 0.0 if k <= r * m else 1.0

    def third(k: int, m: int, r: float) -> float:
        return binomial_tail_p_value(k, m, r) / 3.0

    failures = dict.fromkeys((*starts, "empirical", "third"), 0)
    answered_at_m0 = answered_from_top = 0
    for _ in range(trials):
        scores = rng.random(n)
        errors = (rng.random(n) < 0.3 * (1.0 - scores)).astype(np.int64)
        ranked = RankedScores.from_arrays(scores, errors)
        runs: dict[int | str | None, LttResult] = {
            start: ltt_point(ranked, target, DELTA, min_selected=start) for start in starts
        }
        runs["empirical"] = ltt_point(ranked, target, DELTA, p_value=empirical)
        runs["third"] = ltt_point(ranked, target, DELTA, p_value=third)
        for key, res in runs.items():
            failures[key] += res.threshold is not None and _population_risk(res.threshold) > target
        answered_at_m0 += runs[None].feasible
        answered_from_top += ltt_point(ranked, target, DELTA, min_selected=1).feasible
    allowed = _allowed_failures(trials, DELTA)
    for start in starts:
        assert failures[start] <= allowed, (start, failures[start], allowed)
    assert failures["empirical"] > allowed and failures["third"] > allowed, (failures, allowed)
    # the rule does not collapse: from the very top (1 answered sample, p = 0.92 > δ) nothing
    # is ever certified; from m0 almost always something
    assert answered_from_top == 0 and answered_at_m0 >= 0.8 * trials
