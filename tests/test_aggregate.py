import math

import numpy as np
import pytest
from scipy import stats as sps

from sgdlab.experiments import aggregate as agg


def test_summarize_matches_hand_computed_statistics():
    x = [0.2, 0.4, 0.1, 0.7, 0.6]
    s = agg.summarize(x, method="percentile", n_boot=5000, seed=3)
    assert s.n == 5
    assert s.mean == pytest.approx(0.4)
    assert s.median == pytest.approx(0.4)
    assert s.std == pytest.approx(math.sqrt(sum((v - 0.4) ** 2 for v in x) / 4))
    # the same resamples drawn by hand
    rng = np.random.default_rng(3)
    idx = rng.integers(0, 5, size=(5000, 5))
    boot = np.asarray(x)[idx].mean(axis=1)
    lo, hi = np.quantile(boot, [0.025, 0.975])
    assert (s.ci_low, s.ci_high) == (pytest.approx(lo), pytest.approx(hi))


def test_expanded_interval_is_wider_and_uses_the_t_correction():
    x = np.random.default_rng(0).normal(size=8)
    p = agg.bootstrap_ci(x, method="percentile")
    e = agg.bootstrap_ci(x, method="expanded")
    assert e[0] < p[0] and e[1] > p[1]
    tail = agg._tail(0.95, 8, "expanded")
    assert tail == pytest.approx(sps.norm.cdf(-math.sqrt(8 / 7) * sps.t.ppf(0.975, 7)))
    assert tail < 0.025


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="values"):
        agg.summarize([])
    with pytest.raises(ValueError, match="level"):
        agg.bootstrap_ci([1.0, 2.0], level=1.5)
    with pytest.raises(ValueError, match="paired"):
        agg.bootstrap_difference([1, 2, 3], [1, 2], paired=True)
    with pytest.raises(ValueError, match="finite"):
        agg.summarize([1.0, float("nan")])


@pytest.mark.parametrize("method,n", [("percentile", 30), ("expanded", 10)])
def test_bootstrap_coverage_of_the_true_mean(method, n):
    # 300 repetitions of n normal samples: the 95% interval should contain the true mean about 95% of the
    # time; tolerance 3 binomial standard errors (plus the percentile interval's known O(1/n) undercoverage).
    rng = np.random.default_rng(123)
    reps, mu = 300, 1.5
    hits = 0
    for r in range(reps):
        x = rng.normal(mu, 2.0, size=n)
        lo, hi = agg.bootstrap_ci(x, n_boot=2000, seed=r, method=method)
        hits += lo <= mu <= hi
    cover = hits / reps
    se = math.sqrt(0.95 * 0.05 / reps)
    slack = 0.02 if method == "percentile" else 0.0
    assert 0.95 - 3 * se - slack <= cover <= 0.95 + 3 * se, cover


def test_difference_paired_and_unpaired():
    base = np.array([0.30, 0.35, 0.28, 0.33, 0.31, 0.36])
    treat = base - 0.02 + np.array([0.001, -0.001, 0.002, 0.0, -0.002, 0.001])
    d = agg.bootstrap_difference(treat, base, paired=True)
    assert d.paired and d.estimate == pytest.approx(treat.mean() - base.mean())
    assert d.ci_high < 0  # the per-seed differences are all about -0.02
    u = agg.bootstrap_difference(treat, base)
    assert not u.paired and u.ci_high - u.ci_low > d.ci_high - d.ci_low  # pairing removes the seed variation


def test_bootstrap_function_of_two_samples():
    a, b = np.arange(10.0), np.arange(10.0) + 5
    est, lo, hi = agg.bootstrap_function([a, b], lambda s: s[1].mean() - s[0].mean(), n_boot=500)
    assert est == pytest.approx(5.0) and lo < 5.0 < hi


def test_curve_interpolates_wall_clock_series():
    trials = [{"rows": [{"time": 0.0, "train_loss": 2.0}, {"time": 2.0, "train_loss": 0.0}]},
              {"rows": [{"time": 0.0, "train_loss": 4.0}, {"time": 1.0, "train_loss": 2.0},
                        {"time": 3.0, "train_loss": 0.0}]}]
    grid, ys = agg.curve(trials, "train_loss", "time", points=3)
    assert grid.tolist() == [0.0, 1.0, 2.0]
    assert ys[0].tolist() == [2.0, 1.0, 0.0] and ys[1].tolist() == [4.0, 2.0, 1.0]


def test_metrics_and_json_readers_name_the_damaged_file(tmp_path):
    from sgdlab.errors import ConfigError

    f = tmp_path / "metrics.jsonl"
    f.write_text('{"step": 0, "train_loss": null}\n{"step": 10, "train_loss": 1.5}\n{"step": 20, "tr')
    rows = agg.read_metrics(tmp_path)  # a torn last line (no newline: a killed run) is dropped, as resume does
    assert [r["step"] for r in rows] == [0, 10] and math.isnan(rows[0]["train_loss"])
    f.write_text('{"step": 0}\nnot json\n{"step": 10}\n')
    with pytest.raises(ConfigError, match=r"metrics\.jsonl:2: not a JSON line"):
        agg.read_metrics(tmp_path)
    j = tmp_path / "summary.json"
    for text, match in [('{"status": "compl', r"summary\.json:1: not valid JSON"),
                        ("[1, 2]", r"summary\.json: expected a JSON object, got list")]:
        j.write_text(text)
        with pytest.raises(ConfigError, match=match):
            agg.read_json_object(j)
    j.write_bytes(b"\xff\xfe{}")
    with pytest.raises(ConfigError, match=r"summary\.json: not UTF-8"):
        agg.read_json_object(j)
