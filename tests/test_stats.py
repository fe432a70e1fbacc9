"""Paired statistics of the A/B flow (act_plugin.eval.stats)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as st

from act_plugin.eval.stats import compare, macro_bootstrap_ci, mcnemar, paired_bootstrap_ci


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


# ----------------------------------------------------------------------------- minimum detectable effect
def test_minimum_detectable_effect_matches_a_hand_computation():
    from act_plugin.eval.stats import minimum_detectable_effect

    # By hand, n = 150 documents, 20% discordant, alpha 0.05 two-sided, power 0.8:
    # z_a = 1.959964, z_b = 0.841621; sqrt(n) z_a = 12.247449 * 1.959964 = 24.004557;
    # n - z_a^2 + z_b^2 = 150 - 3.841459 + 0.708326 = 146.866867, sqrt = 12.118864,
    # z_b * 12.118864 = 10.199494; (24.004557 + 10.199494) / (150 + 0.708326) = 0.226956;
    # d = sqrt(0.2) * 0.226956 = 0.447214 * 0.226956 = 0.101498.
    d = minimum_detectable_effect(150, 0.2, alpha=0.05, power=0.8)
    assert d == pytest.approx(0.101498, abs=2e-6)
    # and it is the d at which Connor's sample-size formula gives back n = 150
    za, zb = 1.959964, 0.841621
    n_back = (za * np.sqrt(0.2) + zb * np.sqrt(0.2 - d * d)) ** 2 / (d * d)
    assert n_back == pytest.approx(150, rel=1e-4)


def test_minimum_detectable_effect_behaviour():
    from act_plugin.eval.stats import minimum_detectable_effect as mde

    assert mde(0, 0.2) is None and mde(100, 0.0) is None  # nothing to say without data or flips
    assert mde(1000, 0.1) < mde(100, 0.1) < mde(10, 0.1)  # more documents resolve smaller effects
    assert mde(500, 0.05) < mde(500, 0.2)  # fewer flips: smaller detectable effect
    assert mde(500, 0.1, power=0.9) > mde(500, 0.1, power=0.8)
    assert mde(500, 0.1, alpha=0.01) > mde(500, 0.1, alpha=0.05)
    assert mde(2, 0.5) <= 0.5  # never more than the discordant rate
    with pytest.raises(ValueError):
        mde(100, 0.1, alpha=1.5)
