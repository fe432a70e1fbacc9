"""Paired statistics shared by eval and search (act_plugin.stats): McNemar's exact test, its
exact power and the minimum detectable effect (checked against brute-force enumeration of
outcome tables), bootstrap CIs, per-task comparisons."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats as st

from act_plugin.stats import (
    compare,
    critical_counts,
    describe_mde,
    exact_power,
    macro_bootstrap_ci,
    mcnemar,
    mcnemar_p,
    min_discordant_pairs,
    minimum_detectable_effect,
    paired_bootstrap_ci,
    resolution,
)


def test_mcnemar_hand_checked():
    # b=1, c=6: n=7, P(X<=1) = (1 + 7) / 2**7 = 0.0625 -> exact two-sided p = 0.125;
    # mid-p = 2 * (0.0625 - 0.5 * 7/128) = 0.0703125
    r = mcnemar(1, 6)
    assert r.p_exact == pytest.approx(0.125, abs=1e-12)
    assert r.p_midp == pytest.approx(0.0703125, abs=1e-12)
    assert mcnemar(6, 1) == type(r)(6, 1, r.p_exact, r.p_midp)  # symmetric


@pytest.mark.parametrize("b,c", [(0, 5), (3, 3), (10, 2), (17, 40), (0, 1)])
def test_mcnemar_matches_scipy(b, c):
    r = mcnemar(b, c)
    assert r.p_exact == pytest.approx(st.binomtest(min(b, c), b + c, 0.5).pvalue)
    assert 0 < r.p_midp <= r.p_exact <= 1


def test_mcnemar_no_discordant_pairs():
    r = mcnemar(0, 0)
    assert (r.p_exact, r.p_midp) == (1.0, 1.0)


def test_bootstrap_ci_sanity():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2, 400)
    treat = base.copy()
    flip = rng.choice(400, 60, replace=False)
    treat[flip[:45]] = 1
    treat[flip[45:]] = 0
    delta = treat.mean() - base.mean()
    lo, hi = paired_bootstrap_ci(base, treat, resamples=4000, seed=1)
    assert lo < delta < hi
    assert 0 < hi - lo < 0.15
    # reproducible with the same seed
    assert paired_bootstrap_ci(base, treat, resamples=4000, seed=1) == (lo, hi)
    # more documents -> narrower interval
    lo2, hi2 = paired_bootstrap_ci(np.tile(base, 4), np.tile(treat, 4), resamples=4000, seed=1)
    assert hi2 - lo2 < hi - lo


def test_bootstrap_degenerate_identical_arms():
    x = np.array([1, 0, 1, 1, 0])
    assert paired_bootstrap_ci(x, x) == (0.0, 0.0)
    c = compare(x, x)
    assert (c.delta, c.ci_low, c.ci_high, c.improved, c.worsened, c.p_value) == (0.0, 0.0, 0.0, 0, 0, 1.0)


def test_compare_counts_and_seeds():
    base = np.array([[1, 1], [0, 0], [0, 1], [1, 0], [1, 1]])
    treat = np.array([[1, 1], [1, 1], [0, 0], [1, 1], [0, 1]])
    c = compare(base, treat, resamples=1000)
    assert (c.n, c.seeds) == (5, 2)
    assert c.improved == 3 and c.worsened == 2  # over (doc, seed) pairs
    assert c.both_correct == 4 and c.both_wrong == 1
    assert (c.docs_better, c.docs_worse) == (2, 2)
    assert c.delta == pytest.approx(treat.mean() - base.mean())
    assert c.p_value == pytest.approx(mcnemar(2, 2).p_exact)
    with pytest.raises(ValueError):
        compare([1, 0], [1, 0, 1])
    with pytest.raises(ValueError):
        compare([1, 2], [1, 0])


def test_macro_bootstrap():
    rng = np.random.default_rng(3)
    pairs = []
    for shift in (0.1, -0.05, 0.0):
        b = rng.integers(0, 2, 200)
        t = np.where(rng.random(200) < abs(shift), 1 - b if shift else b, b)
        pairs.append((b, t))
    point = np.mean([t.mean() - b.mean() for b, t in pairs])
    lo, hi = macro_bootstrap_ci(pairs, resamples=2000)
    assert lo <= point <= hi
    assert macro_bootstrap_ci([(np.ones(3), np.ones(3))] * 2) == (0.0, 0.0)


# ----------------------------------------------------------------------------- exact power and MDE
def _p_by_hand(better: int, worse: int) -> float:
    """Two-sided exact binomial p from integer counts (no scipy): 2 * P(X <= min) / 2**m."""
    m = better + worse
    if m == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(m, i) for i in range(min(better, worse) + 1)) / 2 ** m)


def _power_by_documents(n: int, d: float, delta: float, alpha: float = 0.05) -> float:
    """Power by walking every outcome of every document (3**n tables: unchanged, better, worse)."""
    q = (1 + delta / d) / 2
    prob = {"=": 1 - d, "+": d * q, "-": d * (1 - q)}
    total = 0.0
    for outcome in itertools.product("=+-", repeat=n):
        better, worse = outcome.count("+"), outcome.count("-")
        if _p_by_hand(better, worse) < alpha:
            total += math.prod(prob[o] for o in outcome)
    return total


def _power_by_tables(n: int, d: float, delta: float, alpha: float = 0.05) -> float:
    """The same, summing the multinomial probability of each (better, worse) count table."""
    q = (1 + delta / d) / 2
    pb, pw, pu = d * q, d * (1 - q), 1 - d
    total = 0.0
    for better in range(n + 1):
        for worse in range(n + 1 - better):
            if _p_by_hand(better, worse) < alpha:
                ways = math.comb(n, better) * math.comb(n - better, worse)
                total += ways * pb ** better * pw ** worse * pu ** (n - better - worse)
    return total


def test_mcnemar_p_matches_integer_arithmetic():
    for better in range(25):
        for worse in range(25):
            assert mcnemar_p(better, worse) == pytest.approx(_p_by_hand(better, worse), rel=1e-9, abs=1e-15)
    with pytest.raises(ValueError, match="non-negative"):
        mcnemar_p(-1, 3)


def test_critical_region_is_exactly_where_p_is_below_alpha():
    for alpha in (0.05, 0.01, 0.1, 2 / 2 ** 6):  # 2 / 64: a p exactly at alpha is not below it
        k = critical_counts(60, alpha)
        for m in range(61):
            rejected = [b for b in range(m + 1) if _p_by_hand(b, m - b) < alpha]
            assert rejected == [b for b in range(m + 1) if min(b, m - b) <= k[m]], (alpha, m)
        fewest = min_discordant_pairs(alpha)
        assert k[fewest] >= 0 and (fewest == 1 or k[fewest - 1] == -1)
    assert min_discordant_pairs(0.05) == 6  # 2 / 2**5 = 0.0625; 2 / 2**6 = 0.031


@pytest.mark.parametrize("n", [1, 4, 7, 9])
def test_exact_power_matches_every_outcome_of_every_document(n):
    for d, delta in [(0.5, 0.0), (0.5, 0.3), (0.9, 0.9), (0.9, -0.6), (1.0, 0.8), (0.3, 0.1)]:
        assert exact_power(n, d, delta) == pytest.approx(_power_by_documents(n, d, delta), abs=1e-12)


@pytest.mark.parametrize("n", [10, 12, 25, 40])
def test_exact_power_matches_all_count_tables(n):
    for d in (0.05, 0.1, 0.3, 0.7):
        for frac in (0.0, 0.25, 0.5, 0.8, 1.0):
            assert exact_power(n, d, frac * d) == pytest.approx(_power_by_tables(n, d, frac * d), abs=1e-12)


@pytest.mark.parametrize("n,d", [(12, 0.9), (12, 0.6), (25, 0.5), (40, 0.3), (40, 0.1)])
def test_mde_is_the_smallest_effect_with_the_power(n, d):
    """Against the enumerated power: the MDE reaches 80% power, 0.001 less does not; None
    exactly when even every changed document moving one way stays below 80%."""
    mde = minimum_detectable_effect(n, d)
    if _power_by_tables(n, d, d) < 0.8:
        assert mde is None
        return
    assert mde is not None and 0 < mde <= d
    assert _power_by_tables(n, d, mde) >= 0.8 - 1e-9
    assert _power_by_tables(n, d, mde - 1e-3) < 0.8


def test_power_rises_with_the_effect_and_has_the_stated_size():
    for n, d in [(30, 0.2), (200, 0.1), (1000, 0.05)]:
        powers = [exact_power(n, d, f * d) for f in np.linspace(0, 1, 21)]
        assert all(b >= a - 1e-12 for a, b in zip(powers, powers[1:]))
        assert powers[0] <= 0.05  # no effect: rejected at most alpha of the time (exact test)
        assert exact_power(n, d, -0.5 * d) == pytest.approx(exact_power(n, d, 0.5 * d))  # two-sided
    assert exact_power(0, 0.1, 0.0) == exact_power(100, 0.0, 0.0) == 0.0
    with pytest.raises(ValueError, match="exceeds the discordance"):
        exact_power(100, 0.1, 0.2)


def test_mde_limits_and_monotonicity():
    mde = minimum_detectable_effect
    assert mde(0, 0.2) is None and mde(100, 0.0) is None  # nothing to say without data or flips
    assert mde(10000, 0.1) < mde(1000, 0.1) < mde(100, 0.1) <= 0.1  # more documents resolve smaller effects
    assert mde(2000, 0.05) < mde(2000, 0.2)  # fewer flips: smaller detectable effect
    assert mde(500, 0.1, power=0.9) > mde(500, 0.1, power=0.8)
    assert mde(500, 0.1, alpha=0.01) > mde(500, 0.1, alpha=0.05)
    # a planning figure: ~2,000 documents for a 2-point change at 10% discordance
    assert mde(1962, 0.1) == pytest.approx(0.0204, abs=3e-4)
    # with many discordant pairs the exact test approaches the normal approximation (Connor 1987)
    n, p = 40000, 0.1
    za, zb = st.norm.ppf(0.975), st.norm.ppf(0.8)
    connor = np.sqrt(p) * (np.sqrt(n) * za + zb * np.sqrt(n - za * za + zb * zb)) / (n + zb * zb)
    assert mde(n, p) == pytest.approx(connor, rel=0.02)
    with pytest.raises(ValueError, match="alpha"):
        mde(100, 0.1, alpha=1.5)
    with pytest.raises(ValueError, match="power"):
        mde(100, 0.1, power=1.0)


def test_the_demo_case_sst5_with_3_discordant_pairs_is_not_resolvable():
    """make demo: SST-5 at n = 100 with 3 discordant pairs. The normal approximation printed
    'resolves effects of at least 3.0 points'; the exact test cannot reach p < 0.05 at all."""
    assert max(mcnemar_p(b, 3 - b) for b in range(4)) == 1.0 and min(mcnemar_p(b, 3 - b) for b in range(4)) == 0.25
    assert minimum_detectable_effect(100, 0.03) is None
    assert exact_power(100, 0.03, 0.03) < 0.1  # even all flips one way: rarely 6 or more of them
    r = resolution(100, 3, 0.01)
    assert r.mde is None and not r.resolved
    assert r.note == "3 discordant pairs: an exact McNemar test cannot reach p < 0.05 with fewer than 6"


def test_resolution_words():
    big = resolution(872, 186, 0.108)  # SST-2 on its full dev split: 140 / 46 flips
    assert big.resolved and big.note is None and big.mde is not None and big.mde < 0.108
    small = resolution(1066, 60, 0.009)
    assert not small.resolved and small.mde is not None
    assert small.note is not None and small.note.startswith("n = 1066 documents resolves effects of at least")
    assert "the reported +0.9 is smaller" in small.note
    hopeless = resolution(30, 6, 0.2)  # enough pairs to reject, too few documents for 80% power
    assert hopeless.mde is None and not hopeless.resolved and "cannot resolve any effect" in (hopeless.note or "")
    assert resolution(100, 4, 0.0).resolved  # 2 / 2 flips: delta 0 needs no resolving
    assert resolution(0, 0, float("nan")).resolved
    assert describe_mde(0.0512) == "5.1 pt" and describe_mde(None) == "none resolvable"
    assert describe_mde(None, discordance_known=False) == "n/a"
