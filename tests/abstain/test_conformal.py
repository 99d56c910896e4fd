"""Conformal prediction sets (abstain/conformal.py): scores, quantile and sets against numbers
worked out by hand, and the guarantee — conditional on abstention, on synthetic models, over many
calibration draws — that holds with the Mondrian quantile and fails without it."""

from __future__ import annotations

import math

import numpy as np
import pytest

from abstain.conformal import (
    conformal_quantile,
    cumulative_mass,
    min_samples,
    nonconformity,
    prediction_sets,
)

P = np.array([[0.5, 0.2, 0.3], [0.4, 0.4, 0.2]])


def test_aps_mass_ranks_by_probability_and_breaks_ties_by_class_index() -> None:
    # row 0: order 0 (0.5), 2 (0.3), 1 (0.2) -> masses 0.5, 1.0, 0.8; row 1: 0, 1 tie -> 0 first
    np.testing.assert_allclose(cumulative_mass(P), [[0.5, 1.0, 0.8], [0.4, 0.8, 1.0]])


def test_scores_by_hand() -> None:
    labels = np.array([2, 1])
    np.testing.assert_allclose(nonconformity(P, labels, "lac"), [0.7, 0.6])  # 1 - p_y
    np.testing.assert_allclose(nonconformity(P, labels, "aps"), [0.8, 0.8])


def test_sets_by_hand() -> None:
    # LAC at q = 0.65: 1 - p = [0.5, 0.8, 0.7] and [0.6, 0.6, 0.8] -> {0} and {0, 1}
    assert prediction_sets(P, 0.65, "lac").tolist() == [[True, False, False], [True, True, False]]
    # APS at q = 0.8: masses [0.5, 1.0, 0.8] and [0.4, 0.8, 1.0] -> {0, 2} and {0, 1}
    assert prediction_sets(P, 0.8, "aps").tolist() == [[True, False, True], [True, True, False]]
    # APS below the top class's mass: an empty set (the input is unlike the calibration data)
    assert prediction_sets(P, 0.3, "aps").tolist() == [[False] * 3, [False] * 3]
    assert prediction_sets(P, None, "lac").all()  # no finite quantile: every class


def test_quantile_rank_and_the_fewest_samples() -> None:
    scores = np.arange(1, 20) / 100.0  # 19 scores 0.01 … 0.19
    assert conformal_quantile(scores, 0.1) == pytest.approx(0.18)  # rank ⌈20 · 0.9⌉ = 18
    assert conformal_quantile(scores[:9], 0.1) == pytest.approx(0.09)  # rank ⌈10 · 0.9⌉ = 9 = n
    assert conformal_quantile(scores[:8], 0.1) is None  # rank 9 > 8 samples
    assert (min_samples(0.1), min_samples(0.05), min_samples(0.2)) == (9, 19, 4)
    with pytest.raises(ValueError, match="alpha should be in"):
        conformal_quantile(scores, 0.0)
    with pytest.raises(ValueError, match="method should be one of"):
        prediction_sets(P, 0.5, "raps")


@pytest.mark.parametrize("method", ["lac", "aps"])
def test_the_label_is_in_the_set_exactly_when_its_score_is_at_most_the_quantile(method: str) -> None:
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(6), size=500)
    labels = rng.integers(0, 6, size=500)
    scores = nonconformity(probs, labels, method)
    q = float(np.quantile(scores, 0.7))
    held = prediction_sets(probs, q, method)[np.arange(500), labels]
    assert np.array_equal(held, scores <= q)


def _synthetic(rng: np.random.Generator, n: int, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """A calibrated 5-class model of accuracy about 0.82: probs ``[n, K]`` and labels drawn from them."""
    logits = rng.normal(0.0, 4.0, size=(n, k))
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    labels = (probs.cumsum(axis=1) > rng.random((n, 1))).argmax(axis=1)
    return probs, labels


def _abstention_sets(method: str, fit_on: str, trials: int = 300) -> tuple[float, float, float]:
    """Over calibration draws: the mean test miscoverage among abstentions, its standard error, and
    the abstentions' mean set size.

    Each draw: 600 calibration and 2,000 test samples; the threshold answers the 70 % most
    confident calibration samples (fitted on the same data, as ``abstain calibrate`` does); the
    quantile on the calibration samples ``fit_on`` names: ``abstained`` (Mondrian, what
    ``abstain calibrate`` does) or ``all``.
    """
    rng = np.random.default_rng(7)
    alpha, rates, sizes = 0.1, [], []
    for _ in range(trials):
        probs, labels = _synthetic(rng, 2_600)
        cal, test = slice(0, 600), slice(600, None)
        confidence = probs.max(axis=1)
        threshold = np.sort(confidence[cal])[::-1][int(0.7 * 600) - 1]
        abstained = confidence < threshold
        fit = abstained[cal] if fit_on == "abstained" else np.ones(600, dtype=bool)
        q = conformal_quantile(nonconformity(probs[cal][fit], labels[cal][fit], method), alpha)
        sets = prediction_sets(probs[test][abstained[test]], q, method)
        held = sets[np.arange(sets.shape[0]), labels[test][abstained[test]]]
        rates.append(1.0 - held.mean())
        sizes.append(sets.sum(axis=1).mean())
    return float(np.mean(rates)), float(np.std(rates) / math.sqrt(trials)), float(np.mean(sizes))


@pytest.mark.parametrize("method", ["lac", "aps"])
def test_sets_hold_the_label_of_abstentions_at_least_one_minus_alpha_of_the_time(method: str) -> None:
    mean, se, _ = _abstention_sets(method, "abstained")
    assert mean <= 0.1 + 3 * se  # the promise, up to the Monte-Carlo noise
    assert mean >= 0.1 - 0.03  # and not trivially: about 180 abstentions leave it close to alpha


def test_a_lac_quantile_fitted_on_every_sample_breaks_the_promise_for_abstentions() -> None:
    """The deliberately wrong calibration, plain (marginal) conformal: its promise is over all
    inputs, and abstentions are the hard ones, so their LAC sets miss the label more than alpha."""
    mean, se, _ = _abstention_sets("lac", "all", trials=100)
    assert mean > 0.1 + 0.03 + 3 * se


def test_aps_quantile_fitted_on_every_sample_gives_abstentions_larger_sets_than_needed() -> None:
    """APS the other way: the marginal quantile over-covers abstentions, so the per-decision one
    keeps the promise with smaller sets."""
    mondrian_miss, _, mondrian_size = _abstention_sets("aps", "abstained", trials=100)
    marginal_miss, _, marginal_size = _abstention_sets("aps", "all", trials=100)
    assert marginal_miss < mondrian_miss - 0.02 and marginal_size > mondrian_size + 0.2
