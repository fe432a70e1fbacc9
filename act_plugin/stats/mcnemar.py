"""McNemar's exact test, its power and the minimum detectable effect (MDE) of a paired A/B.

The test: of the ``m`` discordant pairs (documents one arm gets right and the other wrong),
``b`` went one way; under "no effect" ``b ~ Binomial(m, 1/2)``, and the two-sided exact p is
``min(1, 2 P(Binomial(m, 1/2) <= min(b, m - b)))``. A result is significant when ``p < alpha``.

Power, exactly (no normal approximation): on ``n`` documents, each changes its outcome with
probability ``d`` (the discordance) and a changed one moves towards the calibrated arm with
probability ``q``, so the paired accuracy change is ``delta = d (2q - 1)``, i.e.
``q = (1 + delta / d) / 2``. Then ``m ~ Binomial(n, d)``, ``b | m ~ Binomial(m, q)``, and the
power is ``sum_m P(m) P(min(b, m - b) <= k_m | m)``, with ``k_m`` the largest count the test
rejects at ``m`` discordant pairs (its critical region, computed once per ``m``). The power
rises with ``|delta|``, so the MDE -- the smallest ``|delta|`` detected with the stated power
-- is found by bisection on ``[0, d]``. When even ``delta = d`` (every changed document moving
the same way) falls short, no effect is resolvable and the MDE is ``None``.

Why exact: at small discordance the normal approximation claims effects the exact test
cannot detect at all. With fewer than :func:`min_discordant_pairs` discordant pairs (6 at
alpha 0.05: ``2 / 2**5 = 0.0625``) no outcome reaches ``p < alpha``; the approximation
still printed "n = 100 resolves effects of at least 3.0 points" for 3 discordant pairs.

:func:`resolution` and :func:`describe_mde` give the words both reports (eval and search)
use for these numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats as _st

__all__ = ["McNemar", "mcnemar", "mcnemar_p", "min_discordant_pairs", "critical_counts", "exact_power",
           "minimum_detectable_effect", "Resolution", "resolution", "describe_mde",
           "MDE_ALPHA", "MDE_POWER", "PLANNING_DISCORDANCE"]

# The minimum detectable effect is stated at these (two-sided alpha, power).
MDE_ALPHA = 0.05
MDE_POWER = 0.8
# Share of prompts a head set changes (flips either way) assumed when planning before the
# discordance is known (the search's validation budget); 3-17% seen on SmolLM2's dev splits.
PLANNING_DISCORDANCE = 0.10
# Bisection stops when the MDE is known to this many accuracy points (fraction 1e-6).
_MDE_TOLERANCE = 1e-6
# Probability left out at each end of the distribution of the discordant count (speed only).
_NEGLIGIBLE = 1e-13


@dataclass(frozen=True)
class McNemar:
    b: int  # baseline wrong, calibrated right
    c: int  # baseline right, calibrated wrong
    p_exact: float
    p_midp: float


def _two_sided_p(k: np.ndarray | int, m: np.ndarray | int) -> np.ndarray:
    """Exact two-sided p of ``k`` = the smaller of the two discordant counts out of ``m``."""
    return np.minimum(1.0, 2.0 * _st.binom.cdf(k, m, 0.5))


def mcnemar_p(better: int, worse: int) -> float:
    """Exact two-sided McNemar p-value (binomial test of the discordant pairs, p = 1/2)."""
    better, worse = int(better), int(worse)
    if better < 0 or worse < 0:
        raise ValueError(f"discordant counts must be non-negative, got {better}, {worse}")
    if better + worse == 0:
        return 1.0
    return float(_two_sided_p(min(better, worse), better + worse))


def mcnemar(b: int, c: int) -> McNemar:
    """McNemar's test from the two discordant counts: exact p and the (less conservative) mid-p."""
    p_exact = mcnemar_p(b, c)
    b, c = int(b), int(c)
    n, k = b + c, min(b, c)
    if n == 0:
        return McNemar(b, c, 1.0, 1.0)
    p_mid = 2.0 * (float(_st.binom.cdf(k, n, 0.5)) - 0.5 * float(_st.binom.pmf(k, n, 0.5)))
    return McNemar(b, c, p_exact, min(1.0, p_mid))


def _check_level(alpha: float, power: float | None = None) -> None:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if power is not None and not 0.0 < power < 1.0:
        raise ValueError(f"power must be in (0, 1), got {power}")


def min_discordant_pairs(alpha: float = MDE_ALPHA) -> int:
    """The fewest discordant pairs with which the exact test can reach ``p < alpha`` at all
    (all of them one way: ``p = 2 / 2**m``)."""
    _check_level(alpha)
    m = 1
    while 2.0 ** (1 - m) >= alpha:
        m += 1
    return m


def critical_counts(max_pairs: int, alpha: float = MDE_ALPHA) -> np.ndarray:
    """``k[m]`` for ``m = 0 .. max_pairs`` discordant pairs: the test rejects when the smaller
    discordant count is ``<= k[m]``; ``-1`` where no outcome reaches ``p < alpha``."""
    _check_level(alpha)
    m = np.arange(max_pairs + 1)
    # ppf: the smallest k with cdf >= alpha/2; the rejected counts lie just below it. Then one
    # step either way with the p-value itself, so the region is exactly where p < alpha.
    k = np.nan_to_num(_st.binom.ppf(alpha / 2.0, m, 0.5), nan=0.0).astype(int) - 1
    k = np.where(_two_sided_p(k + 1, m) < alpha, k + 1, k)
    k = np.where((k >= 0) & (_two_sided_p(k, m) >= alpha), k - 1, k)
    return np.maximum(k, -1)


def exact_power(n: int, discordance: float, delta: float, alpha: float = MDE_ALPHA) -> float:
    """Probability that the exact two-sided McNemar test rejects at ``alpha`` on ``n`` documents
    when a share ``discordance`` of them changes outcome and the accuracy changes by ``delta``
    (a fraction, ``|delta| <= discordance``)."""
    _check_level(alpha)
    if n < 0 or not 0.0 <= discordance <= 1.0:
        raise ValueError(f"need n >= 0 and a discordance in [0, 1], got n={n}, discordance={discordance}")
    delta = abs(float(delta))
    if delta > discordance + 1e-12:
        raise ValueError(f"|delta| = {delta} exceeds the discordance {discordance}: "
                         f"an accuracy can only change through the documents that change")
    if n == 0 or discordance == 0.0:
        return 0.0  # no discordant pair: the test never rejects
    # the counts of discordant pairs that carry all but ~1e-13 of the probability
    first = int(_st.binom.ppf(_NEGLIGIBLE, n, discordance)) if discordance < 1.0 else n
    last = int(_st.binom.isf(_NEGLIGIBLE, n, discordance)) if discordance < 1.0 else n
    m = np.arange(max(0, first - 1), min(n, last + 1) + 1)
    k = critical_counts(int(m[-1]), alpha)[m]
    q = min(1.0, (1.0 + delta / discordance) / 2.0)
    reject = _st.binom.cdf(k, m, q) + _st.binom.sf(m - k - 1, m, q)  # b <= k or b >= m - k
    return float(np.clip(np.sum(_st.binom.pmf(m, n, discordance) * reject), 0.0, 1.0))


def minimum_detectable_effect(n: int, discordance: float, alpha: float = MDE_ALPHA,
                              power: float = MDE_POWER) -> float | None:
    """Smallest ``|delta|`` (accuracy change, a fraction) the exact two-sided McNemar test at
    ``alpha`` detects with probability ``power`` on ``n`` documents of which a share
    ``discordance`` changes outcome.

    ``None`` when nothing is resolvable: no documents, no discordance (the rate is then
    unknown, not zero), or a power out of reach even when every changed document moves the
    same way (``delta = discordance``)."""
    _check_level(alpha, power)
    if n <= 0 or not discordance > 0.0:
        return None
    d = min(1.0, float(discordance))
    if exact_power(n, d, d, alpha) < power:
        return None
    if exact_power(n, d, 0.0, alpha) >= power:  # only with power <= alpha: any change is "detected"
        return 0.0
    lo, hi = 0.0, d  # power(lo) < power <= power(hi); the power rises with delta
    while hi - lo > _MDE_TOLERANCE:
        mid = 0.5 * (lo + hi)
        if exact_power(n, d, mid, alpha) >= power:
            hi = mid
        else:
            lo = mid
    return hi


@dataclass(frozen=True)
class Resolution:
    """Whether an observed paired delta is resolved at its n, and why not (``note``)."""

    mde: float | None  # at the observed discordance (None: see minimum_detectable_effect)
    resolved: bool
    note: str | None  # why the delta is not resolved, in words; None when it is


def resolution(n: int, discordant: int, delta: float, alpha: float = MDE_ALPHA,
               power: float = MDE_POWER) -> Resolution:
    """The MDE at the observed discordance (``discordant`` of ``n`` documents changed) and
    whether ``delta`` is resolved by it. A delta of 0, or no document at all, needs no
    resolving; otherwise it is unresolved when the exact test cannot reach ``p < alpha`` with
    so few discordant pairs, when no effect is resolvable at this n, or when ``|delta|`` is
    below the MDE."""
    rate = discordant / n if n > 0 else 0.0
    mde = minimum_detectable_effect(n, rate, alpha, power)
    if n <= 0 or not delta or np.isnan(delta):
        return Resolution(mde, True, None)
    fewest = min_discordant_pairs(alpha)
    if discordant < fewest:
        note = (f"{discordant} discordant pairs: an exact McNemar test cannot reach p < {alpha:g} "
                f"with fewer than {fewest}")
    elif mde is None:
        note = (f"n = {n} documents at {100 * rate:.1f}% discordance cannot resolve any effect (power {power:g} is "
                f"out of reach at alpha {alpha:g} even if every changed document moved the same way)")
    elif abs(delta) < mde:
        note = (f"n = {n} documents resolves effects of at least {100 * mde:.1f} points (exact McNemar, "
                f"alpha {alpha:g}, power {power:g}, at the observed {100 * rate:.1f}% discordance); "
                f"the reported {100 * delta:+.1f} is smaller")
    else:
        return Resolution(mde, True, None)
    return Resolution(mde, False, note)


def describe_mde(mde: float | None, discordance_known: bool = True) -> str:
    """An MDE as a report cell: ``"5.1 pt"``, ``"none resolvable"`` (no effect can be resolved
    at this n), or ``"n/a"`` (no document changed, so the discordance is unknown)."""
    if mde is not None:
        return f"{100 * mde:.1f} pt"
    return "none resolvable" if discordance_known else "n/a"
