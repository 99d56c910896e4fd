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

from abstain.bounds import coverage_prediction_interval, risk_exceeds_target
from abstain.thresholds import RankedScores, coverage_point, sgr_point

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
