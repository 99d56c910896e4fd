"""Exact binomial bounds in numpy (no scipy): Clopper–Pearson intervals and the SGR tail bound.

For ``k`` successes (errors, or selected samples) in ``n`` Bernoulli trials with unknown
rate ``p``, the exact one-sided upper bound at level ``δ`` is the ``b`` solving

    P(Bin(n, b) <= k) = Σ_{j=0}^{k} C(n, j) b^j (1 - b)^{n-j} = δ,

i.e. the largest rate that still makes seeing only ``k`` unlikely-but-possible
(Clopper & Pearson, Biometrika 1934). Geifman & El-Yaniv ("Selective classification for
deep neural networks", NeurIPS 2017) use exactly this inversion, ``B*(r̂, δ, S)``, to bound
the selective risk in Selection with Guaranteed Risk (SGR): with probability >= 1 - δ the
true rate is <= the bound. (For ``k = 0`` it is ``1 - δ^{1/n}``.)

The same tail read the other way is a p-value of ``H: risk > target``, what Learn then Test
(Angelopoulos, Bates, Candès, Jordan, Lei 2021) tests at each threshold:
:func:`binomial_tail_p_value` (exact) and :func:`hoeffding_bentkus_p_value` (any bounded loss).

The binomial CDF is summed in log space over the window of terms that matter (see
:func:`binomial_cdf`), so a bound for ``n = 10^6`` costs a few milliseconds.
"""

from __future__ import annotations

import math
from collections.abc import Callable

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


def beta_binomial_pmf(n: int, a: float, b: float) -> np.ndarray:
    """``P(K = k)`` for ``k = 0..n`` of ``K ~ BetaBinomial(n, a, b)`` (float64 ``[n + 1]``).

    ``P(K = k) = C(n, k) B(k + a, n - k + b) / B(a, b)``. Computed in log space from
    ``P(K = 0)`` by the ratio ``P(k + 1) / P(k) = (n - k)(k + a) / ((k + 1)(n - k - 1 + b))``
    (one cumulative sum, ``O(n)``, no scipy), then normalised so rounding cannot leak mass.
    """
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise ValueError(f"n (number of trials) should be a positive integer, but got {n!r}")
    if not (a > 0.0 and b > 0.0):
        raise ValueError(f"a and b should be positive, but got a={a!r}, b={b!r}")
    k = np.arange(n, dtype=np.float64)  # k = 0 .. n-1: steps to k + 1
    log0 = math.lgamma(n + b) + math.lgamma(a + b) - math.lgamma(n + a + b) - math.lgamma(b)
    steps = np.log((n - k) * (k + a)) - np.log((k + 1.0) * (n - k - 1.0 + b))
    log_pmf = log0 + np.r_[0.0, np.cumsum(steps)]
    pmf = np.exp(log_pmf - log_pmf.max())
    return pmf / pmf.sum()


def coverage_prediction_interval(
    n_selected: int, n: int, n_test: int, confidence: float = 0.95
) -> tuple[float, float]:
    """Where a threshold's coverage on ``n_test`` *new* samples will land, with probability
    ``>= confidence``: ``[lower, upper]`` as fractions of ``n_test``.

    The threshold answered ``n_selected`` (= ``m``) of ``n`` calibration samples, i.e. it is
    the ``m``-th largest calibration score. For continuous scores and exchangeable data the
    population coverage of the ``m``-th largest of ``n`` is ``Beta(m, n - m + 1)``-distributed
    (the ``m``-th smallest of ``n`` uniforms), and given it the test count is binomial, so the
    test count is exactly ``BetaBinomial(n_test, m, n - m + 1)`` — a predictive distribution
    that carries the variance of *both* samples. (In Bayesian terms it is the posterior
    predictive of a ``Beta(0, 1)`` prior; it is also the exact law of split-conformal
    coverage, Vovk 2012, Angelopoulos & Bates 2021 §3.) Each tail gets at most
    ``(1 - confidence) / 2``, so a test coverage falls outside with probability at most
    ``1 - confidence`` (less, since counts are discrete).

    Why not the calibration-time Clopper–Pearson interval: that bounds the *population*
    coverage given the calibration sample, and ignores the test sample's own binomial spread,
    so a test coverage leaves it far more often than ``1 - confidence``.

    Example: ``m = 1, n = 1, n_test = 1`` → ``K ~ BetaBinomial(1, 1, 1)``, uniform on {0, 1}.
    """
    _check_counts(n_selected, n)
    _check_level(confidence, "confidence")
    if isinstance(n_test, bool) or int(n_test) != n_test or n_test < 1:
        raise ValueError(f"n_test should be a positive integer, but got {n_test!r}")
    if n_selected == 0:  # a threshold above every calibration score: Beta(0, ·) is a point mass at 0
        return 0.0, 0.0
    tail = (1.0 - confidence) / 2.0
    cdf = np.cumsum(beta_binomial_pmf(int(n_test), float(n_selected), float(n - n_selected + 1)))
    # lower: the first k with P(K <= k) > tail, so P(K < lower) <= tail;
    # upper: the first k with P(K <= k) >= 1 - tail, so P(K > upper) <= tail
    lower = int(np.searchsorted(cdf, tail, side="right"))
    upper = min(int(np.searchsorted(cdf, 1.0 - tail, side="left")), int(n_test))
    return lower / n_test, upper / n_test


def risk_exceeds_target(n_errors: int, n_selected: int, target: float, delta: float) -> bool:
    """Do ``n_errors`` wrong answers among ``n_selected`` show, at level ``δ``, that the selective
    risk is above ``target``? (One-sided exact binomial test: ``binomial_lower_bound > target``.)

    When the true risk is ``<= target`` this says yes with probability ``<= δ``, whatever the
    test set's size — unlike "the test risk is above the target", which a true risk just below
    the target fails about half the time. Example: 3 errors in 10 against a target of 0.1 —
    ``P(Bin(10, 0.1) >= 3) = 0.070``, so at ``δ = 0.05`` the target is not refuted.
    """
    _check_counts(n_errors, n_selected)
    _check_level(delta)
    return binomial_lower_bound(n_errors, n_selected, delta) > target


def _empty_or_certain(n_errors: int, n_selected: int, target: float) -> bool:
    """Validate a p-value's arguments; True when no test is needed: nothing selected (no
    evidence, p = 1) or ``target = 1`` (``risk > 1`` is impossible, p = 0)."""
    if not 0.0 < target <= 1.0 or math.isnan(target):
        raise ValueError(f"target should be in (0, 1], but got {target!r}")
    if n_selected == 0 and n_errors == 0:
        return True
    _check_counts(n_errors, n_selected)
    return target == 1.0


def binomial_tail_p_value(n_errors: int, n_selected: int, target: float) -> float:
    """Exact p-value of ``H: risk > target`` from ``n_errors`` wrong answers among ``n_selected``:
    ``P(Bin(n_selected, target) <= n_errors)`` (1 when nothing is selected).

    Valid because the error count of ``n`` i.i.d. answers is ``Bin(n, R)`` and, under ``H``
    (``R > target``), ``Bin(n, R)`` is stochastically larger than ``Bin(n, target)``, so
    ``P(p <= α) <= α``. It is the p-value that inverts :func:`binomial_upper_bound`:
    ``p <= δ  ⇔  binomial_upper_bound(n_errors, n_selected, δ) <= target`` (Learn then Test,
    Angelopoulos et al. 2021, §3.2, binary losses). Example: 1 error in 4 against 0.5 →
    ``P(Bin(4, 0.5) <= 1) = 5/16``.
    """
    if _empty_or_certain(n_errors, n_selected, target):
        return 1.0 if n_selected == 0 else 0.0
    return binomial_cdf(n_errors, n_selected, target)


def hoeffding_bentkus_p_value(n_errors: int, n_selected: int, target: float) -> float:
    """The Hoeffding–Bentkus p-value of ``H: risk > target`` (Learn then Test, Angelopoulos et
    al. 2021, Proposition 3; Bates et al. 2021, RCPS): ``min(p_H, p_B)`` (1 when nothing is
    selected), with ``r̂ = n_errors / n_selected`` and ``n = n_selected``

    * Hoeffding: ``p_H = exp(-n h(min(r̂, target), target))``, ``h(a, b) = a log(a/b) +
      (1 - a) log((1 - a)/(1 - b))`` (the binary relative entropy);
    * Bentkus: ``p_B = e · P(Bin(n, target) <= n r̂)``.

    Valid for any loss in [0, 1], not only 0/1 errors, and therefore never smaller than
    :func:`binomial_tail_p_value` for 0/1 errors (Chernoff: ``P(Bin <= k) <= p_H``; and
    ``p_B`` is ``e`` times it): an option for when the exact one is not wanted, at a cost in
    coverage. Example: 1 error in 4 against 0.5 → ``p_H = 2 · (2/3)^3 = 16/27``,
    ``p_B = 5e/16``, so ``16/27``; 0 errors in ``n`` → ``(1 - target)^n``, as exact.
    """
    if _empty_or_certain(n_errors, n_selected, target):
        return 1.0 if n_selected == 0 else 0.0
    n, a = n_selected, min(n_errors / n_selected, target)
    # n · h(a, target), with 0 · log 0 = 0
    kl = (a * math.log(a / target) if a > 0.0 else 0.0) + (1.0 - a) * math.log((1.0 - a) / (1.0 - target))
    hoeffding = math.exp(-n * kl)
    bentkus = math.e * binomial_cdf(n_errors, n_selected, target)
    return min(1.0, hoeffding, bentkus)


#: A p-value of ``H: risk > target``: ``(n_errors, n_selected, target) -> p``.
PValue = Callable[[int, int, float], float]
#: The p-values Learn-then-Test may use, by the name ``abstain calibrate --p-value`` takes.
P_VALUES: dict[str, PValue] = {
    "exact": binomial_tail_p_value,
    "hoeffding_bentkus": hoeffding_bentkus_p_value,
}
