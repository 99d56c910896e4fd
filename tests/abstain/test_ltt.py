"""Learn then Test (fixed sequence): its p-values and the procedure, on numbers worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from abstain.bounds import (
    binomial_tail_p_value,
    binomial_upper_bound,
    hoeffding_bentkus_p_value,
    samples_needed_for_zero_errors,
)
from abstain.thresholds import RankedScores, ltt_point, ltt_start_count

# descending scores .9 .8 .7 .6 with errors 0 0 1 1: the top m have 0, 0, 1, 2 errors
FOUR = RankedScores.from_arrays(np.array([0.6, 0.9, 0.7, 0.8]), np.array([1, 0, 1, 0]))


def test_exact_p_value_by_hand() -> None:
    assert binomial_tail_p_value(1, 4, 0.5) == pytest.approx(5 / 16)  # (1 + 4) / 2^4
    assert binomial_tail_p_value(0, 3, 0.1) == pytest.approx(0.9**3)
    assert binomial_tail_p_value(2, 3, 0.5) == pytest.approx(7 / 8)
    assert binomial_tail_p_value(0, 0, 0.1) == 1.0  # nothing answered: no evidence
    assert binomial_tail_p_value(3, 3, 1.0) == 0.0  # risk > 1 is impossible


def test_exact_p_value_inverts_the_upper_bound() -> None:
    # p <= δ exactly when the exact upper bound at δ is <= the target (SGR's bound, one test)
    for k, n, target in [(0, 59, 0.05), (3, 200, 0.04), (10, 1000, 0.015), (10, 1000, 0.016)]:
        p = binomial_tail_p_value(k, n, target)
        assert (p <= 0.05) == (binomial_upper_bound(k, n, 0.05) <= target)


def test_hoeffding_bentkus_p_value_by_hand() -> None:
    # 1 error in 4 against 0.5: Hoeffding exp(-4 h(1/4, 1/2)) = 2 · (2/3)^3 = 16/27,
    # Bentkus e · P(Bin(4, 1/2) <= 1) = 5e/16 = 0.849 → the smaller, 16/27
    assert hoeffding_bentkus_p_value(1, 4, 0.5) == pytest.approx(16 / 27)
    # empirical risk above the target: Hoeffding gives 1, Bentkus e · 15/16 > 1 → capped at 1
    assert hoeffding_bentkus_p_value(3, 4, 0.5) == 1.0
    # zero errors: both reduce to (1 - r)^n (Bentkus is e times that)
    assert hoeffding_bentkus_p_value(0, 10, 0.2) == pytest.approx(0.8**10)
    assert hoeffding_bentkus_p_value(0, 0, 0.2) == 1.0
    # it holds for any loss in [0, 1], so for 0/1 errors it is never below the exact one
    for k, n in [(1, 10), (5, 100), (30, 1000), (0, 7)]:
        assert hoeffding_bentkus_p_value(k, n, 0.05) >= binomial_tail_p_value(k, n, 0.05) - 1e-15


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: binomial_tail_p_value(1, 4, 0.0), r"target should be in \(0, 1\]"),
        (lambda: hoeffding_bentkus_p_value(1, 4, 1.5), r"target should be in \(0, 1\]"),
        (lambda: binomial_tail_p_value(5, 4, 0.1), r"k \(number of successes\)"),
        (lambda: ltt_point(FOUR, 0.5, 1.0), r"delta should be in \(0, 1\)"),
        (lambda: ltt_point(FOUR, 0.0, 0.1), r"target risk should be in \(0, 1\]"),
        (lambda: ltt_point(FOUR, 0.5, 0.1, p_value="hoeffding"), "p_value should be one of exact, "),
        (lambda: ltt_point(FOUR, 0.5, 0.1, min_selected=0), "min_selected should be a positive integer"),
    ],
)
def test_bad_arguments(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_start_count_is_the_fewest_samples_that_can_reject() -> None:
    # (1 - r)^m <= δ: m >= ln δ / ln(1 - r) = 58.4 → 59; 298.07 → 299; the same as SGR's
    # samples_needed_for_zero_errors at the whole δ
    assert ltt_start_count(0.05, 0.05) == 59 == samples_needed_for_zero_errors(0.05, 0.05)
    assert ltt_start_count(0.01, 0.05) == 299 == math.ceil(math.log(0.05) / math.log(0.99))
    assert ltt_start_count(0.01, 0.05, "hoeffding_bentkus") == 299  # both are (1 - r)^m at 0 errors
    assert 0.99**299 <= 0.05 < 0.99**298
    assert ltt_start_count(1.0, 0.05) == 1
    # any p-value of the right shape: p(0, m) = 1/m reaches 0.1 at m = 10
    assert ltt_start_count(0.2, 0.1, lambda k, m, r: 1.0 / m) == 10


def test_fixed_sequence_by_hand() -> None:
    # r = 0.5, δ = 0.3: m0 = 2 (0.5^2 = 0.25 <= 0.3 < 0.5); top 2: 0 errors, p = 1/4, rejected;
    # top 3: 1 error, p = P(Bin(3, 1/2) <= 1) = 1/2 > 0.3, stop → threshold 0.8
    res = ltt_point(FOUR, 0.5, delta=0.3)
    assert res.feasible and res.start_min_selected == 2 and res.start_threshold == 0.8
    assert (res.threshold, res.coverage, res.risk, res.n_selected, res.n_errors) == (0.8, 0.5, 0.0, 2, 0)
    assert res.p_value == pytest.approx(0.25) and res.start_p_value == pytest.approx(0.25)
    assert res.n_tested == 2  # the rejected start and the first non-rejection
    # δ = 0.55: m0 = 1; p = 1/2, 1/4, 1/2 rejected, top 4 (2 errors) p = 11/16 not → coverage 0.75
    res = ltt_point(FOUR, 0.5, delta=0.55)
    assert (res.start_min_selected, res.threshold, res.coverage, res.n_errors) == (1, 0.7, 0.75, 1)
    assert res.p_value == pytest.approx(0.5) and res.n_tested == 4


def test_stops_at_the_first_non_rejection_even_when_a_later_threshold_would_pass() -> None:
    # errors by descending score 0 1 0 0 0 0, r = 0.5, δ = 0.3: m0 = 2, the top 2 hold one error,
    # p = 3/4 > 0.3 → nothing, although the top 6 (1 error, p = 7/64 = 0.109) would pass alone
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    ranked = RankedScores.from_arrays(scores, np.array([0, 1, 0, 0, 0, 0]))
    res = ltt_point(ranked, 0.5, delta=0.3)
    assert not res.feasible and res.threshold is None and res.n_tested == 1
    assert res.start_p_value == pytest.approx(0.75) and res.samples_needed == 2
    assert binomial_tail_p_value(1, 6, 0.5) == pytest.approx(7 / 64)


def test_fewer_samples_than_the_start_needs_certify_nothing() -> None:
    res = ltt_point(FOUR, 0.05, delta=0.05)  # m0 = 59 > 4
    assert not res.feasible and res.start_threshold is None and res.n_tested == 0
    assert res.samples_needed == 59 and res.start_p_value is None


def test_min_selected_moves_the_start() -> None:
    # starting at the top 3 (1 error, p = 1/2) with δ = 0.55: rejected; top 4: 11/16, not
    res = ltt_point(FOUR, 0.5, delta=0.55, min_selected=3)
    assert (res.start_threshold, res.threshold, res.n_tested) == (0.7, 0.7, 2)
    # a start at the very top of a larger sample: 1 answered, 0 errors, p = 0.95 > δ → nothing
    rng = np.random.default_rng(0)
    ranked = RankedScores.from_arrays(rng.random(500), np.zeros(500, dtype=np.int64))
    assert not ltt_point(ranked, 0.05, 0.05, min_selected=1).feasible
    assert ltt_point(ranked, 0.05, 0.05).coverage == 1.0  # zero errors: everything certified


def test_ties_are_tested_as_one_threshold() -> None:
    # scores .9 .7 .7 .5 (errors 0 1 0 1): thresholds .9 (1 answered), .7 (3 answered, 1 error)
    ranked = RankedScores.from_arrays(np.array([0.9, 0.7, 0.7, 0.5]), np.array([0, 1, 0, 1]))
    res = ltt_point(ranked, 0.5, delta=0.55, min_selected=2)  # first threshold answering >= 2: .7
    assert res.start_threshold == 0.7 and res.n_selected == 3 and res.p_value == pytest.approx(0.5)


def _brute_force(ranked: RankedScores, target: float, delta: float, m0: int) -> int:
    """Index of the last threshold of the passing run, testing every threshold (-1: none)."""
    last = -1
    for j in range(ranked.thresholds.size):
        if ranked.n_selected[j] < m0:
            continue
        if binomial_tail_p_value(int(ranked.n_errors[j]), int(ranked.n_selected[j]), target) > delta:
            break
        last = j
    return last


def test_testing_only_where_errors_grow_equals_testing_every_threshold() -> None:
    rng = np.random.default_rng(3)
    for trial in range(40):
        n = int(rng.integers(50, 400))
        scores = np.round(rng.random(n), 2)  # ties on purpose
        errors = (rng.random(n) < 0.25 * (1.0 - scores)).astype(np.int64)
        ranked = RankedScores.from_arrays(scores, errors)
        target = float(rng.choice([0.05, 0.1, 0.15]))
        res = ltt_point(ranked, target, 0.1)
        last = _brute_force(ranked, target, 0.1, res.start_min_selected)
        expected = None if last < 0 else float(ranked.thresholds[last])
        assert res.threshold == expected, trial
