"""abstain.bounds: exact binomial bounds checked by closed forms worked out by hand."""

from __future__ import annotations

import math

import pytest

from abstain.bounds import (
    binomial_cdf,
    binomial_lower_bound,
    binomial_upper_bound,
    clopper_pearson,
    samples_needed_for_zero_errors,
)


def test_cdf_small_cases_by_hand() -> None:
    assert binomial_cdf(1, 2, 0.5) == pytest.approx(0.75)  # 1 - 1/4
    assert binomial_cdf(0, 3, 0.5) == pytest.approx(0.125)
    assert binomial_cdf(2, 2, 0.3) == 1.0
    assert binomial_cdf(0, 5, 0.0) == 1.0
    assert binomial_cdf(4, 5, 1.0) == 0.0


def test_cdf_large_n_matches_the_normal_approximation_at_the_mean() -> None:
    # Bin(10^6, 0.5) is symmetric: P(X <= n/2) = 1/2 + P(X = n/2)/2, P(X = n/2) ≈ 1/sqrt(pi n / 2)
    n = 10**6
    expected = 0.5 + 0.5 / math.sqrt(math.pi * n / 2)
    assert binomial_cdf(n // 2, n, 0.5) == pytest.approx(expected, rel=1e-6)


def test_upper_bound_closed_forms() -> None:
    # k = 0: (1 - b)^n = δ  →  b = 1 - δ^(1/n)
    assert binomial_upper_bound(0, 1, 0.05) == pytest.approx(0.95)
    assert binomial_upper_bound(0, 100, 0.05) == pytest.approx(1 - 0.05 ** (1 / 100))
    # k = 1, n = 2: P(X <= 1) = 1 - b^2 = δ  →  b = sqrt(1 - δ); the general (bisection) path
    assert binomial_upper_bound(1, 2, 0.19) == pytest.approx(0.9, abs=1e-12)
    # k = 1, n = 3: (1 - b)^2 (1 + 2b) = δ at the bound
    b = binomial_upper_bound(1, 3, 0.125)
    assert (1 - b) ** 2 * (1 + 2 * b) == pytest.approx(0.125, abs=1e-12)
    assert binomial_upper_bound(4, 4, 0.05) == 1.0


def test_upper_bound_on_a_million_matches_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")  # test-only oracle; abstain itself is numpy-only
    for k, n, delta in ((20_000, 10**6, 0.05 / 21), (900_000, 10**6, 0.025), (3, 359, 0.01)):
        expected = stats.beta.ppf(1 - delta, k + 1, n - k)
        assert binomial_upper_bound(k, n, delta) == pytest.approx(expected, rel=1e-9)


def test_clopper_pearson_edges() -> None:
    assert clopper_pearson(0, 1, 0.95) == pytest.approx((0.0, 0.975))
    assert clopper_pearson(1, 1, 0.95) == pytest.approx((0.025, 1.0))
    lo, hi = clopper_pearson(2, 4, 0.9)
    assert lo == pytest.approx(1 - hi)  # symmetric around 1/2
    assert binomial_lower_bound(0, 7, 0.05) == 0.0


def test_samples_needed_for_zero_errors_by_hand() -> None:
    # bound with 0 errors in m: 1 - δ^(1/m) <= target
    # δ = 0.25, target 0.5: m = 1 gives 0.75, m = 2 gives exactly 0.5
    assert samples_needed_for_zero_errors(0.5, 0.25) == 2
    # δ = 0.125, target 0.5: m = 2 gives 0.646, m = 3 gives 0.5
    assert samples_needed_for_zero_errors(0.5, 0.125) == 3
    m = samples_needed_for_zero_errors(0.02, 0.05)
    assert binomial_upper_bound(0, m, 0.05) <= 0.02 < binomial_upper_bound(0, m - 1, 0.05)


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match=r"k \(number of successes\) should be an integer in \[0, n=3\]"):
        binomial_upper_bound(4, 3, 0.05)
    with pytest.raises(ValueError, match=r"n .* should be a positive integer"):
        binomial_cdf(0, 0, 0.5)
    with pytest.raises(ValueError, match=r"delta should be in \(0, 1\)"):
        binomial_upper_bound(0, 3, 1.0)
    with pytest.raises(ValueError, match=r"confidence should be in \(0, 1\)"):
        clopper_pearson(0, 3, 95)


def test_beta_binomial_pmf_by_hand() -> None:
    from abstain.bounds import beta_binomial_pmf

    # BetaBinomial(3, 2, 3): P(0) = B(2, 6) / B(2, 3) = (1/42) / (1/12) = 2/7, and so on
    assert beta_binomial_pmf(3, 2.0, 3.0) == pytest.approx([2 / 7, 12 / 35, 9 / 35, 4 / 35])
    assert beta_binomial_pmf(4, 1.0, 1.0) == pytest.approx([0.2] * 5)  # uniform prior → uniform
    with pytest.raises(ValueError, match="a and b should be positive"):
        beta_binomial_pmf(3, 0.0, 1.0)


def test_coverage_prediction_interval_by_hand() -> None:
    from abstain.bounds import coverage_prediction_interval

    # m = 1 of n = 1: test count ~ BetaBinomial(2, 1, 1), uniform on {0, 1, 2}, CDF 1/3, 2/3, 1
    assert coverage_prediction_interval(1, 1, 2, confidence=0.5) == (0.0, 1.0)  # tails 0.25
    assert coverage_prediction_interval(1, 1, 2, confidence=0.2) == (0.5, 0.5)  # tails 0.4
    # it is wider than calibration's Clopper–Pearson interval: it adds the test sample's spread
    lo, hi = coverage_prediction_interval(900, 1000, 1000, 0.95)
    cp_lo, cp_hi = clopper_pearson(900, 1000, 0.95)
    assert lo < cp_lo and hi > cp_hi
    # with a huge test set it shrinks to the population uncertainty, ≈ Clopper–Pearson's width
    lo, hi = coverage_prediction_interval(900, 1000, 1_000_000, 0.95)
    assert hi - lo == pytest.approx(cp_hi - cp_lo, rel=0.05)
    assert coverage_prediction_interval(0, 10, 5) == (0.0, 0.0)
    with pytest.raises(ValueError, match="n_test should be a positive integer"):
        coverage_prediction_interval(5, 10, 0)


def test_risk_exceeds_target_by_hand() -> None:
    from abstain.bounds import risk_exceeds_target

    # P(Bin(10, 0.1) >= 3) = 1 - 0.9^10 - 10 · 0.1 · 0.9^9 - 45 · 0.01 · 0.9^8 = 0.0702
    assert not risk_exceeds_target(3, 10, 0.1, delta=0.05)  # 0.0702 > 0.05: not shown
    assert risk_exceeds_target(3, 10, 0.1, delta=0.1)  # 0.0702 < 0.1: shown above 0.1
    assert not risk_exceeds_target(0, 10, 0.0001, delta=0.05)  # no errors never refute a target
