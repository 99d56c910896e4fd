"""Temperature scaling and the label-free risk estimate (abstain/temperature.py): by hand, and on
synthetic models whose true temperature is known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from abstain.temperature import (
    calibrated_confidence,
    estimated_risk,
    fit_temperature,
    negative_log_likelihood,
)

LOGITS = np.array([[0.0, math.log(3.0)]])  # softmax (1/4, 3/4)


def test_likelihood_and_confidence_by_hand() -> None:
    assert negative_log_likelihood(LOGITS, np.array([1])) == pytest.approx(math.log(4 / 3))
    # at T = 2 the logits are (0, ln 3 / 2): p_1 = √3 / (1 + √3)
    assert negative_log_likelihood(LOGITS, np.array([1]), 2.0) == pytest.approx(
        math.log((1 + math.sqrt(3)) / math.sqrt(3))
    )
    assert calibrated_confidence(LOGITS, 1.0)[0] == pytest.approx(0.75)
    assert calibrated_confidence(LOGITS, 2.0)[0] == pytest.approx(math.sqrt(3) / (1 + math.sqrt(3)))
    with pytest.raises(ValueError, match="positive finite"):
        calibrated_confidence(LOGITS, 0.0)


def test_estimated_risk_by_hand() -> None:
    # answered: 0.9 and 0.8 -> expected errors 0.1 and 0.2, mean 0.15 (the abstained 0.6 is not counted)
    assert estimated_risk(np.array([0.9, 0.6, 0.8]), np.array([True, False, True])) == pytest.approx(0.15)
    assert estimated_risk(np.array([0.9]), np.array([False])) is None


def _drawn_at(rng: np.random.Generator, temperature: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits ``[n, 6]`` and labels drawn from ``softmax(logits / temperature)``."""
    logits = rng.normal(0.0, 3.0, size=(n, 6))
    z = logits / temperature
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    return logits, (p.cumsum(axis=1) > rng.random((n, 1))).argmax(axis=1)


@pytest.mark.parametrize("true_temperature", [0.5, 1.0, 2.0])
def test_the_fit_recovers_the_temperature_labels_were_drawn_at(true_temperature: float) -> None:
    logits, labels = _drawn_at(np.random.default_rng(1), true_temperature, 20_000)
    fit = fit_temperature(logits, labels)
    assert fit.temperature == pytest.approx(true_temperature, rel=0.05)
    assert fit.nll <= fit.nll_uncalibrated
    assert fit.n == 20_000


def test_with_the_fitted_temperature_the_estimate_matches_the_errors_of_the_answered() -> None:
    """Fit T on one sample, answer the 80 % most confident of another: the estimate equals the
    measured selective risk up to its sampling error; at T = 1 (overconfident) it is far below."""
    rng = np.random.default_rng(2)
    logits, labels = _drawn_at(rng, 2.0, 40_000)
    fit = fit_temperature(logits[:10_000], labels[:10_000])
    test_logits, test_labels = logits[10_000:], labels[10_000:]
    confidence = calibrated_confidence(test_logits, fit.temperature)
    answered = confidence >= np.quantile(confidence, 0.2)
    errors = test_logits.argmax(axis=1) != test_labels
    measured = float(errors[answered].mean())
    se = math.sqrt(measured * (1 - measured) / answered.sum())
    estimate = estimated_risk(confidence, answered)
    assert estimate is not None
    assert abs(estimate - measured) < 4 * se
    uncalibrated = estimated_risk(calibrated_confidence(test_logits, 1.0), answered)
    assert uncalibrated is not None and uncalibrated < measured - 10 * se
