"""Exact binomial bounds in numpy (no scipy): Clopper–Pearson intervals and the SGR tail bound.

For ``k`` successes (errors, or selected samples) in ``n`` Bernoulli trials with unknown
rate ``p``, the exact one-sided upper bound at level ``δ`` is the ``b`` solving

    P(Bin(n, b) <= k) = Σ_{j=0}^{k} C(n, j) b^j (1 - b)^{n-j} = δ,

i.e. the largest rate that still makes seeing only ``k`` unlikely-but-possible
(Clopper & Pearson, Biometrika 1934). Geifman & El-Yaniv ("Selective classification for
deep neural networks", NeurIPS 2017) use exactly this inversion, ``B*(r̂, δ, S)``, to bound
the selective risk in Selection with Guaranteed Risk (SGR): with probability >= 1 - δ the
true rate is <= the bound. (For ``k = 0`` it is ``1 - δ^{1/n}``.)

The binomial CDF is summed in log space over the window of terms that matter (see
:func:`binomial_cdf`), so a bound for ``n = 10^6`` costs a few milliseconds.
"""

from __future__ import annotations

import math

import numpy as np

#: Terms of the CDF sum smaller than exp(-_LOG_NEGLIGIBLE) times the largest are dropped:
#: they change the sum by less than float64's resolution.
_LOG_NEGLIGIBLE = 50.0
#: Bisection steps on b in [0, 1]: 2^-60 is far below any reported digit.
_BISECTION_STEPS = 60


def _check_counts(k: int, n: int) -> None:
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise ValueError(f"n (number of trials) should be a positive integer, but got {n!r}")
    if isinstance(k, bool) or int(k) != k or not 0 <= k <= n:
        raise ValueError(f"k (number of successes) should be an integer in [0, n={n}], but got {k!r}")


def _check_level(delta: float, name: str = "delta") -> None:
    if not 0.0 < delta < 1.0:
        raise ValueError(f"{name} should be in (0, 1), but got {delta!r}")


def binomial_cdf(k: int, n: int, p: float) -> float:
    """``P(Bin(n, p) <= k)``, accurate to float64 rounding for any ``n``.

    Why a window: ``log C(n, j) + j log p + (n - j) log(1 - p)`` is concave in ``j``
    (second difference <= -1/(j+1)), so beyond ``sqrt(2 · 50 · (k + 1))`` places from the
    largest term ``j* = min(k, mode)`` every term is below ``e^-50`` of it; only that window
    is summed, with ``log C`` accumulated from one ``math.lgamma`` at its start.
    """
    _check_counts(k, n)
    if p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 1.0 if k == n else 0.0
    if k == n:
        return 1.0
    mode = math.floor((n + 1) * p)
    top = min(k, mode)
    width = math.ceil(math.sqrt(2.0 * _LOG_NEGLIGIBLE * (k + 1))) + 2
    lo, hi = max(0, top - width), min(k, top + width)
    j = np.arange(lo, hi + 1, dtype=np.float64)
    log_c0 = math.lgamma(n + 1) - math.lgamma(lo + 1) - math.lgamma(n - lo + 1)
    # log C(n, j+1) - log C(n, j) = log((n - j) / (j + 1))
    steps = np.log((n - j[:-1]) / (j[:-1] + 1.0))
    log_c = log_c0 + np.r_[0.0, np.cumsum(steps)]
    log_terms = log_c + j * math.log(p) + (n - j) * math.log1p(-p)
    peak = float(log_terms.max())
    total = math.exp(peak) * float(np.exp(log_terms - peak).sum())
    return min(1.0, total)


def binomial_upper_bound(k: int, n: int, delta: float) -> float:
    """Exact one-sided upper bound ``b`` with ``P(Bin(n, b) <= k) = δ`` (1 if ``k = n``).

    With probability ``>= 1 - δ`` over the sample, the true rate is ``<= b``. This is
    Geifman & El-Yaniv's ``B*(k/n, δ, n)`` for the selective risk in SGR.
    """
    _check_counts(k, n)
    _check_level(delta)
    if k == n:
        return 1.0
    if k == 0:  # closed form; also a check on the general path in the tests
        return float(-math.expm1(math.log(delta) / n))
    lo, hi = k / n, 1.0  # CDF(k; n, k/n) >= ~1/2 > δ for usual δ; guarded below
    if binomial_cdf(k, n, lo) < delta:
        lo = 0.0
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        if binomial_cdf(k, n, mid) >= delta:  # CDF decreases in p: the root is above mid
            lo = mid
        else:
            hi = mid
    return hi


def binomial_lower_bound(k: int, n: int, delta: float) -> float:
    """Exact one-sided lower bound: ``1 - binomial_upper_bound(n - k, n, δ)`` (0 if ``k = 0``)."""
    _check_counts(k, n)
    _check_level(delta)
    if k == 0:
        return 0.0
    return 1.0 - binomial_upper_bound(n - k, n, delta)


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Two-sided exact (Clopper–Pearson) interval for a binomial rate, ``[lower, upper]``.

    Each side takes ``(1 - confidence) / 2``. Example: ``k = 0, n = 1, 95 %`` gives
    ``[0, 0.975]``; ``k = n`` gives ``[(α/2)^{1/n}, 1]``.
    """
    _check_level(confidence, "confidence")
    alpha = 1.0 - confidence
    return binomial_lower_bound(k, n, alpha / 2), binomial_upper_bound(k, n, alpha / 2)


def samples_needed_for_zero_errors(target: float, delta: float) -> int:
    """Smallest ``m`` such that 0 errors in ``m`` gives ``upper bound <= target`` at level ``δ``.

    ``1 - δ^{1/m} <= target  ⇔  m >= ln δ / ln(1 - target)``. A lower limit on the number of
    *selected* samples any certificate of risk ``target`` needs: with errors it takes more.
    """
    _check_level(delta)
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target should be in (0, 1], but got {target!r}")
    if target == 1.0:
        return 1
    m = max(1, math.ceil(math.log(delta) / math.log1p(-target) - 1e-9))
    # guard against rounding at the boundary: step to the exact smallest m
    while m > 1 and binomial_upper_bound(0, m - 1, delta) <= target:
        m -= 1
    while binomial_upper_bound(0, m, delta) > target:
        m += 1
    return m
