"""Temperature scaling and the label-free estimate of selective risk (numpy only).

Temperature scaling (Guo, Pleiss, Sun & Weinberger, "On Calibration of Modern Neural Networks",
ICML 2017) divides the logits by one scalar ``T`` fitted on labelled validation data to minimise
the negative log-likelihood; the arg-max, hence every prediction, is unchanged, but the softmax
probabilities become calibrated: among inputs given probability ``p``, a fraction ``p`` are right.

With calibrated probabilities the expected error of an answer is ``1 - p`` of its predicted class,
so the mean of ``1 - p`` over the answered inputs estimates the selective risk *before any label
arrives* — the idea of confidence-based performance estimation (NannyML's CBPE). The estimate
rests on one assumption, stated wherever it is shown: the probabilities stay calibrated on live
traffic, i.e. ``P(y | x)`` is what it was on the validation data (covariate shift keeps the
estimate valid, concept shift or a broken preprocessing step does not — labels from
``/feedback`` are what catches those).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: The inverse temperature 1/T is searched in [1/100, 100]: far beyond any network's miscalibration.
_LOG_BETA_RANGE = (-math.log(100.0), math.log(100.0))


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean ``-log softmax(logits / T)[y]`` over the ``N`` rows of ``logits`` ``[N, K]``."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    z_max = z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z - z_max).sum(axis=1)) + z_max[:, 0]
    return float(np.mean(log_norm - z[np.arange(labels.shape[0]), labels]))


@dataclass(frozen=True)
class TemperatureFit:
    """A fitted temperature and the likelihoods before and after (on the fitting data)."""

    temperature: float
    nll: float  # mean NLL at ``temperature``
    nll_uncalibrated: float  # mean NLL at T = 1
    n: int

    def to_dict(self) -> dict[str, float | int | str]:
        return {
            "method": "temperature",
            "temperature": self.temperature,
            "nll": self.nll,
            "nll_uncalibrated": self.nll_uncalibrated,
            "n": self.n,
        }


def fit_temperature(logits: np.ndarray, labels: np.ndarray, iterations: int = 80) -> TemperatureFit:
    """The ``T > 0`` minimising the NLL of ``softmax(logits / T)`` on ``labels``.

    The NLL is convex in the inverse temperature ``β = 1/T`` (a log-sum-exp of ``β z`` minus the
    linear ``β z_y``), hence unimodal in ``log β``, so a golden-section search finds its minimum;
    ``iterations = 80`` shrink the bracket by ``0.618^80`` (below 1e-16 of its width).
    """
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if len(labels) == 0:
        raise ValueError("fitting a temperature needs at least one labelled sample")

    def loss(log_beta: float) -> float:
        return negative_log_likelihood(logits, labels, math.exp(-log_beta))

    lo, hi = _LOG_BETA_RANGE
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = loss(a), loss(b)
    for _ in range(iterations):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = loss(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = loss(b)
    temperature = math.exp(-(lo + hi) / 2.0)
    return TemperatureFit(
        temperature=temperature,
        nll=negative_log_likelihood(logits, labels, temperature),
        nll_uncalibrated=negative_log_likelihood(logits, labels, 1.0),
        n=len(labels),
    )


def calibrated_confidence(logits: np.ndarray, temperature: float) -> np.ndarray:
    """``max_k softmax(logits / T)_k`` per row: float64 ``[N]``, the probability the answer is right."""
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature should be a positive finite number, but got {temperature!r}")
    # the top class's softmax at T is 1 / sum_k exp((z_k - z_max) / T): no full softmax needed
    z = np.asarray(logits, dtype=np.float64)
    return np.asarray(1.0 / np.exp((z - z.max(axis=1, keepdims=True)) / temperature).sum(axis=1))


def estimated_risk(confidence: np.ndarray, answered: np.ndarray) -> float | None:
    """Mean ``1 - confidence`` over the answered samples; ``None`` when none was answered."""
    answered = np.asarray(answered, dtype=bool).reshape(-1)
    if not answered.any():
        return None
    return float(np.mean(1.0 - np.asarray(confidence, dtype=np.float64).reshape(-1)[answered]))
