"""abstain.thresholds: coverage points and SGR, on four samples worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from abstain.bounds import clopper_pearson
from abstain.thresholds import RankedScores, coverage_point, sgr_point

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
    # δ = 0.375 over K = 1 + (4 - 1).bit_length() = 3 probes → δ/3 = 0.125 each
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
    assert res.n_probes == 1 + 99 .bit_length()  # 8
    assert res.coverage == 1.0
    assert res.risk_bound == pytest.approx(1 - (0.05 / 8) ** (1 / 100))  # 0.0495 ≤ 0.05


def test_sgr_single_sample() -> None:
    ranked = RankedScores.from_arrays(np.array([0.3]), np.array([0]))
    res = sgr_point(ranked, 0.99, delta=0.05)
    assert res.n_probes == 1 and res.coverage == 1.0 and res.risk_bound == pytest.approx(0.95)


def test_invalid_targets() -> None:
    with pytest.raises(ValueError, match=r"target coverage should be in \(0, 1\], but got 0.0"):
        coverage_point(FOUR, 0.0)
    with pytest.raises(ValueError, match=r"target risk should be in \(0, 1\], but got 1.5"):
        sgr_point(FOUR, 1.5)
    with pytest.raises(ValueError, match=r"delta should be in \(0, 1\)"):
        sgr_point(FOUR, 0.1, delta=0.0)
    with pytest.raises(ValueError, match="errors should be 0/1"):
        RankedScores.from_arrays(np.array([0.1, 0.2]), np.array([0.5, 0]))
