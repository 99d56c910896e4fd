"""abstain.risk_coverage against values worked out by hand (ties, n = 1, all correct, all wrong)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from abstain.risk_coverage import (
    augrc,
    aurc,
    coverage_and_risk,
    eaurc,
    optimal_aurc,
    risk_at_coverage,
    risk_coverage_curve,
    selection_counts,
    selection_scores,
    softmax_response,
)

SCORES = np.array([0.9, 0.8, 0.7, 0.6])
ERRORS = np.array([0, 1, 0, 1])


def test_areas_on_four_samples_by_hand() -> None:
    # cumulative errors of the top m: 0, 1, 1, 2
    assert aurc(SCORES, ERRORS) == pytest.approx((0 / 1 + 1 / 2 + 1 / 3 + 2 / 4) / 4)  # 0.3333
    # perfect ranking of 2 errors in 4: risks 0, 0, 1/3, 2/4
    assert optimal_aurc(4, 2) == pytest.approx((1 / 3 + 1 / 2) / 4)  # 0.2083
    assert eaurc(SCORES, ERRORS) == pytest.approx(1 / 3 - 5 / 24)  # 0.125
    assert augrc(SCORES, ERRORS) == pytest.approx((0 + 1 + 1 + 2) / 4 / 4)  # 0.25


def test_ties_are_resolved_in_expectation_not_by_order() -> None:
    # two tied samples, one wrong: expected cumulative errors 0.5, 1
    for errors in ([1, 0], [0, 1]):
        assert aurc([0.5, 0.5], errors) == pytest.approx((0.5 / 1 + 1 / 2) / 2)  # 0.5
        assert augrc([0.5, 0.5], errors) == pytest.approx((0.5 / 2 + 1 / 2) / 2)  # 0.375
    # cut inside a tie at coverage 0.5: 1 sure place (error 0) + 1 place at the tie mean 0.5
    assert risk_at_coverage([0.9, 0.7, 0.7, 0.5], [0, 1, 0, 1], 0.5) == pytest.approx(0.25)


def test_selection_counts_enter_ties_together() -> None:
    thresholds, n_sel, n_err = selection_counts([0.9, 0.7, 0.7, 0.5], [0, 1, 0, 1])
    np.testing.assert_array_equal(thresholds, [0.9, 0.7, 0.5])
    np.testing.assert_array_equal(n_sel, [1, 3, 4])
    np.testing.assert_array_equal(n_err, [0, 1, 2])
    cov, risk, _thr = risk_coverage_curve([0.9, 0.7, 0.7, 0.5], [0, 1, 0, 1])
    np.testing.assert_allclose(cov, [0.25, 0.75, 1.0])
    np.testing.assert_allclose(risk, [0.0, 1 / 3, 0.5])


@pytest.mark.parametrize(
    ("errors", "expected_aurc", "expected_eaurc", "expected_augrc"),
    [
        ([0], 0.0, 0.0, 0.0),  # n = 1, correct
        ([1], 1.0, 0.0, 1.0),  # n = 1, wrong: every ranking is the perfect one
        ([0, 0, 0], 0.0, 0.0, 0.0),  # all correct
        ([1, 1, 1], 1.0, 0.0, (1 / 3 + 2 / 3 + 3 / 3) / 3),  # all wrong
    ],
)
def test_edge_cases(
    errors: list[int], expected_aurc: float, expected_eaurc: float, expected_augrc: float
) -> None:
    scores = np.linspace(1.0, 0.0, len(errors))
    assert aurc(scores, errors) == pytest.approx(expected_aurc)
    assert eaurc(scores, errors) == pytest.approx(expected_eaurc, abs=1e-12)
    assert augrc(scores, errors) == pytest.approx(expected_augrc)
    assert risk_at_coverage(scores, errors, 1.0) == pytest.approx(np.mean(errors))


def test_eaurc_is_zero_for_a_perfect_ranking_and_positive_for_a_reversed_one() -> None:
    errors = np.array([0, 0, 0, 1, 1])
    scores = np.array([5.0, 4, 3, 2, 1])
    assert eaurc(scores, errors) == pytest.approx(0.0, abs=1e-12)
    assert eaurc(-scores, errors) > 0.3


def test_coverage_and_risk_at_a_threshold() -> None:
    assert coverage_and_risk([0.9, 0.7, 0.7, 0.5], [0, 1, 0, 1], 0.7) == pytest.approx((0.75, 1 / 3, 3))
    cov, risk, n_sel = coverage_and_risk(SCORES, ERRORS, 0.95)
    assert (cov, n_sel) == (0.0, 0) and math.isnan(risk)


def test_scores_from_graph_outputs() -> None:
    logits = np.array([[0.0, math.log(3.0)]])  # softmax [0.25, 0.75]
    assert softmax_response(logits) == pytest.approx([0.75])
    assert selection_scores(logits, np.array([0.5]), "combined") == pytest.approx([math.sqrt(0.375)])
    assert selection_scores(logits, np.array([0.5]), "selection") == pytest.approx([0.5])
    with pytest.raises(ValueError, match="score should be one of selection, softmax_response, combined"):
        selection_scores(logits, np.array([0.5]), "entropy")


def test_post_hoc_scores_by_hand() -> None:
    # softmax [0.5, 0.3, 0.2] and [0.1, 0.1, 0.8]: margins 0.2 and 0.7; sum p^2 0.38 and 0.66
    logits = np.log(np.array([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]))
    g = np.array([0.9, 0.1])  # the selection head plays no part in either
    assert selection_scores(logits, g, "margin") == pytest.approx([0.2, 0.7])
    assert selection_scores(logits, g, "gini") == pytest.approx([0.38, 0.66])
    # a tie at the top has no margin; the Gini score of a uniform softmax is 1 / K
    tied = np.zeros((1, 4))
    assert selection_scores(tied, np.array([0.5]), "margin") == pytest.approx([0.0])
    assert selection_scores(tied, np.array([0.5]), "gini") == pytest.approx([0.25])


def test_invalid_inputs_are_named() -> None:
    with pytest.raises(ValueError, match="same length"):
        aurc([0.1, 0.2], [0])
    with pytest.raises(ValueError, match="at least one sample"):
        aurc([], [])
    with pytest.raises(ValueError, match="finite"):
        aurc([0.1, float("nan")], [0, 1])
    with pytest.raises(ValueError, match=r"values outside \[0, 1\]"):
        augrc([0.1, 0.2], [0, 2])
    with pytest.raises(ValueError, match=r"coverage should be in \(0, 1\]"):
        risk_at_coverage(SCORES, ERRORS, 0.0)
    with pytest.raises(ValueError, match="n_errors should be in"):
        optimal_aurc(3, 4)
