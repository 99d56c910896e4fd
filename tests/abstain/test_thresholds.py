"""abstain.thresholds: coverage points and SGR, on four samples worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from abstain.bounds import binomial_upper_bound, clopper_pearson
from abstain.thresholds import RankedScores, coverage_point, probe_count, sgr_point

# descending scores; errors of the top m: 0, 0, 1, 2
FOUR = RankedScores.from_arrays(np.array([0.6, 0.9, 0.7, 0.8]), np.array([1, 0, 1, 0]))


def test_coverage_point_by_hand() -> None:
    res = coverage_point(FOUR, 0.5, confidence=0.9)
    assert (res.threshold, res.coverage, res.risk, res.n_selected) == (0.8, 0.5, 0.0, 2)
    assert res.coverage_interval == pytest.approx(clopper_pearson(2, 4, 0.9))
    assert res.risk_interval == pytest.approx((0.0, 1 - 0.05 ** (1 / 2)))  # 0 errors of 2, one side 5 %
    full = coverage_point(FOUR, 1.0)
    assert (full.threshold, full.coverage, full.risk) == (0.6, 1.0, 0.5)


def test_coverage_point_with_ties_answers_the_whole_tie() -> None:
    ranked = RankedScores.from_arrays(np.array([0.9, 0.7, 0.7, 0.5]), np.array([0, 1, 0, 1]))
    res = coverage_point(ranked, 0.5)
    assert (res.threshold, res.coverage, res.n_selected, res.risk) == (0.7, 0.75, 3, pytest.approx(1 / 3))


def test_coverage_point_does_not_round_up_a_whole_sample() -> None:
    ranked = RankedScores.from_arrays(np.arange(10.0), np.zeros(10))
    assert coverage_point(ranked, 0.9).n_selected == 9  # 0.9 * 10 is 9.000000000000002 in floats


def test_sgr_full_coverage_certified_first() -> None:
    # δ = 0.375 over K = ⌈log2 4⌉ + 1 = 3 probes → δ/3 = 0.125 each
    res = sgr_point(FOUR, 0.95, delta=0.375)
    assert res.n_probes == 3 and res.delta_per_probe == pytest.approx(0.125)
    assert res.feasible and res.coverage == 1.0 and len(res.probes) == 1
    b = res.risk_bound  # 2 errors of 4: P(Bin(4, b) <= 2) = 1 - 4b^3 + 3b^4 = 0.125
    assert 1 - 4 * b**3 + 3 * b**4 == pytest.approx(0.125, abs=1e-12)
    assert b == pytest.approx(0.8384, abs=1e-4)


def test_sgr_binary_search_by_hand() -> None:
    # full coverage fails (0.838 > 0.8); then over indices 0..2: mid 1 → 2 selected, 0 errors,
    # bound 1 - sqrt(0.125) = 0.646 ≤ 0.8; mid 2 → 3 selected, 1 error, (1-b)^2 (1+2b) = 0.125
    # at b = 0.7789 ≤ 0.8 → coverage 0.75
    res = sgr_point(FOUR, 0.8, delta=0.375)
    assert res.feasible and (res.threshold, res.coverage, res.n_selected, res.n_errors) == (0.7, 0.75, 3, 1)
    assert res.risk_bound == pytest.approx(0.77894, abs=1e-5)
    assert len(res.probes) == 3
    # a lower target stops at mid 1: coverage 0.5, bound 1 - sqrt(0.125)
    res = sgr_point(FOUR, 0.7, delta=0.375)
    assert (res.threshold, res.coverage) == (0.8, 0.5)
    assert res.risk_bound == pytest.approx(1 - math.sqrt(0.125))


def test_sgr_reports_samples_needed_instead_of_a_threshold() -> None:
    # 0.5: mid 1 bound 0.646 fails, mid 0 (1 selected, 0 errors) bound 0.875 fails
    res = sgr_point(FOUR, 0.5, delta=0.375)
    assert not res.feasible and res.threshold is None and res.coverage is None
    assert res.best_bound == pytest.approx(1 - math.sqrt(0.125))
    assert res.samples_needed == 3  # 1 - 0.125^(1/m) <= 0.5 first at m = 3


def test_sgr_all_correct_answers_everything() -> None:
    ranked = RankedScores.from_arrays(np.linspace(1, 0, 100), np.zeros(100))
    res = sgr_point(ranked, 0.05, delta=0.05)
    assert res.n_probes == math.ceil(math.log2(100)) + 1  # 8
    assert res.coverage == 1.0
    assert res.risk_bound == pytest.approx(1 - (0.05 / 8) ** (1 / 100))  # 0.0495 ≤ 0.05


def test_sgr_single_sample() -> None:
    ranked = RankedScores.from_arrays(np.array([0.3]), np.array([0]))
    res = sgr_point(ranked, 0.99, delta=0.05)
    assert res.n_probes == 1 and res.coverage == 1.0 and res.risk_bound == pytest.approx(0.95)


@pytest.mark.parametrize(
    ("n", "k"), [(1, 1), (2, 2), (3, 3), (4, 3), (5, 4), (8, 4), (9, 5), (1000, 11), (1024, 11), (1025, 12)]
)
def test_probe_count_is_ceil_log2_n_plus_one(n: int, k: int) -> None:
    assert probe_count(n) == k
    if n > 1:
        assert k == math.ceil(math.log2(n)) + 1


def test_sgr_delta_split_is_fixed_by_n_not_by_ties() -> None:
    # the same 64 samples, once with 64 distinct scores and once with 2 distinct values:
    # the δ split must not change with the ties (it would be δ/2 for 2 distinct scores if
    # derived from U, which would make the bound looser-looking data give a tighter bound)
    errors = np.r_[np.zeros(60, dtype=int), np.ones(4, dtype=int)]
    distinct = RankedScores.from_arrays(np.linspace(1.0, 0.0, 64), errors)
    tied = RankedScores.from_arrays(np.r_[np.ones(60), np.zeros(4)], errors)
    a, b = sgr_point(distinct, 0.1, delta=0.05), sgr_point(tied, 0.1, delta=0.05)
    assert a.n_probes == b.n_probes == 7  # ⌈log2 64⌉ + 1
    assert a.delta_per_probe == b.delta_per_probe == pytest.approx(0.05 / 7)
    # the first probe (full coverage, 4 errors of 64) has the same bound in both, at δ/7
    assert a.probes[0]["risk_bound"] == b.probes[0]["risk_bound"] == binomial_upper_bound(4, 64, 0.05 / 7)
    # the tied data certifies the top 60 (0 errors): bound 1 - (δ/7)^(1/60) = 0.079 <= 0.1
    assert b.n_selected == 60 and b.risk_bound == pytest.approx(1 - (0.05 / 7) ** (1 / 60))
    with pytest.raises(ValueError, match="positive integer"):
        probe_count(0)


def test_invalid_targets() -> None:
    with pytest.raises(ValueError, match=r"target coverage should be in \(0, 1\], but got 0.0"):
        coverage_point(FOUR, 0.0)
    with pytest.raises(ValueError, match=r"target risk should be in \(0, 1\], but got 1.5"):
        sgr_point(FOUR, 1.5)
    with pytest.raises(ValueError, match=r"delta should be in \(0, 1\)"):
        sgr_point(FOUR, 0.1, delta=0.0)
    with pytest.raises(ValueError, match="errors should be 0/1"):
        RankedScores.from_arrays(np.array([0.1, 0.2]), np.array([0.5, 0]))
