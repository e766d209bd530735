import math

import numpy as np
import pytest
from scipy import stats as sps

from sgdlab.errors import ConfigError
from sgdlab.experiments import stats as st

SMALLEST_SEEDS = 5  # the fewest final seeds any shipped protocol uses (tests/test_protocols.py checks it)


@pytest.mark.parametrize("dist", ["normal", "t5"])
def test_t_interval_coverage_at_the_smallest_seed_count(dist):
    # 20,000 repetitions: the binomial standard error of a 95% coverage is sqrt(.95 * .05 / 20000) = 0.0015,
    # so the 93-97% band is +-13 standard errors; a 90% interval (the bootstrap's failure) is 33 below.
    rng = np.random.default_rng(20261201)
    reps, n, mu = 20_000, SMALLEST_SEEDS, 0.3
    x = rng.normal(mu, 1.0, (reps, n)) if dist == "normal" else mu + rng.standard_t(5, (reps, n))
    lo, hi = st.t_interval_batch(x)
    cover = float(np.mean((lo <= mu) & (mu <= hi)))
    assert 0.93 <= cover <= 0.97, cover
    # the batch form is the scalar one
    one = st.t_interval(x[0])
    assert (one.low, one.high) == pytest.approx((lo[0], hi[0]))


def test_t_interval_closed_form():
    d = [1.0, 2.0, 3.0, 4.0]
    r = st.t_interval(d)
    half = sps.t.ppf(0.975, 3) * np.std(d, ddof=1) / 2
    assert (r.estimate, r.low, r.high) == pytest.approx((2.5, 2.5 - half, 2.5 + half))
    assert r.p == pytest.approx(sps.ttest_1samp(d, 0).pvalue)
    with pytest.raises(ValueError, match="at least 2"):
        st.t_interval([1.0])


def test_holm_on_constructed_pvalues():
    p = [0.01, 0.04, 0.03, 0.005]
    # sorted: 0.005 (x4 = 0.02), 0.01 (x3 = 0.03), 0.03 (x2 = 0.06), 0.04 (x1 = 0.04 -> running max 0.06)
    assert st.holm(p) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    levels = st.holm_levels(p, 0.05)
    # steps: 0.005 < 0.0125 and 0.01 < 0.0167 rejected; 0.03 >= 0.025 stops: it and 0.04 get level 1 - 0.025
    assert levels == pytest.approx([1 - 0.05 / 3, 1 - 0.025, 1 - 0.025, 1 - 0.0125])
    # consistency: the interval at the Holm level excludes 0 exactly when the adjusted p < alpha
    rng = np.random.default_rng(1)
    samples = [rng.normal(m, 1, 6) for m in (0.0, 0.8, 1.5, 3.0, 0.2)]
    raw = [st.t_interval(s).p for s in samples]
    for s, a, lev in zip(samples, st.holm(raw), st.holm_levels(raw)):
        r = st.t_interval(s, lev)
        assert (r.low > 0 or r.high < 0) == (a < 0.05)


@pytest.mark.parametrize("low,high,direction,outcome,qualifier", [
    (0.02, 0.05, +1, st.SUPPORTED, ""),             # beyond 0 as claimed, reaches the SESOI
    (0.002, 0.008, +1, st.SUPPORTED, st.SMALLER),   # beyond 0 but inside +-SESOI
    (-0.05, -0.02, -1, st.SUPPORTED, ""),           # claimed lower
    (-0.05, -0.02, +1, st.CONTRADICTED, ""),
    (-0.004, 0.006, +1, st.NO_EFFECT, ""),          # contains 0, inside +-0.01
    (-0.004, 0.03, +1, st.INCONCLUSIVE, ""),        # contains 0, reaches past the SESOI
])
def test_four_outcomes_on_constructed_intervals(low, high, direction, outcome, qualifier):
    d = st.decide(low, high, direction, 0.01, sd=0.02, n=5)
    assert (d.outcome, d.qualifier) == (outcome, qualifier)
    if outcome == st.INCONCLUSIVE:
        assert d.seeds_needed == st.seeds_needed(0.02, 0.01) and "seeds" in d.note


def test_non_inferiority():
    assert st.decide(-0.008, 0.01, +1, 0.01, margin=0.01).outcome == st.SUPPORTED
    assert st.decide(-0.05, -0.02, +1, 0.01, margin=0.01).outcome == st.CONTRADICTED
    assert st.decide(-0.02, 0.0, +1, 0.01, margin=0.01).outcome == st.INCONCLUSIVE
    assert st.decide(0.002, 0.008, -1, 0.01, margin=0.01).outcome == st.SUPPORTED  # claimed lower: error
    assert st.decide(0.008, 0.02, -1, 0.01, margin=0.01).outcome == st.INCONCLUSIVE


def test_seeds_needed_matches_the_normal_approximation():
    # n ~ ((z_.975 + z_.8) sd / delta)^2 + a little for the t distribution
    approx = ((1.959964 + 0.841621) * 2.0) ** 2
    n = st.seeds_needed(2.0, 1.0)
    assert approx < n <= approx + 3
    assert st.seeds_needed(0.0, 1.0) == 2


def test_pairing_by_seed_is_required():
    arms = {"a": {0: 1.0, 1: 2.0, 2: 3.0}, "b": {0: 0.5, 1: 1.0, 2: 1.0}, "c": {0: 1.0, 2: 1.0}}
    seeds, v = st.paired_values(arms, {"a": 1, "b": -1})
    assert seeds == [0, 1, 2] and v.tolist() == [0.5, 1.0, 2.0]
    with pytest.raises(ConfigError, match="pairing by seed"):
        st.paired_values(arms, {"a": 1, "c": -1})
    assert math.isclose(st.paired_values(arms, {"a": 0.5, "b": 0.5})[1][0], 0.75)
