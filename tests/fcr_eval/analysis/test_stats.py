"""Statistics against scipy and closed forms."""

from __future__ import annotations

import numpy as np
import pytest
from fcr_eval.analysis.stats import (
    align_paired,
    bootstrap_paired_ci,
    mean_ci,
    paired_bootstrap_ci,
    paired_t_test,
    pearson_r2,
    recovered_fraction,
    recovered_fraction_ci,
)
from scipy import stats


def test_mean_ci_matches_scipy_t_interval():
    x = np.array([21.3, 22.1, 20.8, 21.9])
    ci = mean_ci(x)
    lo, hi = stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
    assert (ci.low, ci.high) == pytest.approx((lo, hi), rel=1e-12)
    assert ci.mean == pytest.approx(x.mean()) and ci.n == 4
    lo90, hi90 = stats.t.interval(0.90, 3, loc=x.mean(), scale=stats.sem(x))
    assert (mean_ci(x, 0.90).low, mean_ci(x, 0.90).high) == pytest.approx((lo90, hi90))


def test_mean_ci_single_value_has_no_interval():
    ci = mean_ci([3.0])
    assert ci.mean == 3.0 and np.isnan(ci.low) and "no CI" in ci.as_text()


def test_paired_t_test_matches_scipy():
    rng = np.random.default_rng(0)
    a = rng.normal(size=30)
    b = a + rng.normal(loc=0.3, scale=0.5, size=30)
    res = paired_t_test(a, b)
    ref = stats.ttest_rel(a, b)
    assert res.t == pytest.approx(ref.statistic) and res.p_value == pytest.approx(ref.pvalue)
    assert res.mean_diff == pytest.approx(np.mean(a - b))
    lo, hi = stats.t.interval(0.95, 29, loc=np.mean(a - b), scale=stats.sem(a - b))
    assert (res.low, res.high) == pytest.approx((lo, hi))
    with pytest.raises(ValueError, match="differ in length"):
        paired_t_test(a, b[:-1])


def test_bootstrap_matches_scipy_percentile_and_covers_mean():
    rng = np.random.default_rng(1)
    a = rng.normal(size=200)
    b = a - 0.5 + rng.normal(scale=0.2, size=200)
    res = bootstrap_paired_ci(a, b, n_resamples=4000, seed=0)
    ref = stats.bootstrap(((a - b),), np.mean, n_resamples=4000, method="percentile", random_state=0)
    assert res.estimate == pytest.approx(np.mean(a - b))
    assert res.low < 0.5 < res.high
    # Same method, different random draws: the intervals agree to Monte-Carlo error.
    assert res.low == pytest.approx(ref.confidence_interval.low, abs=0.01)
    assert res.high == pytest.approx(ref.confidence_interval.high, abs=0.01)
    assert bootstrap_paired_ci(a, b, n_resamples=500, seed=3) == bootstrap_paired_ci(a, b, n_resamples=500, seed=3)


def test_pearson_matches_scipy():
    x = np.array([0.1, 0.4, 0.35, 0.8, 0.9])
    y = np.array([1.0, 2.1, 1.7, 3.9, 4.2])
    c = pearson_r2(x, y)
    ref = stats.pearsonr(x, y)
    assert c.r == pytest.approx(ref.statistic) and c.p_value == pytest.approx(ref.pvalue)
    assert c.r2 == pytest.approx(ref.statistic**2)
    with pytest.raises(ValueError, match="at least 3"):
        pearson_r2([1, 2], [3, 4])
    with pytest.raises(ValueError, match="constant"):
        pearson_r2([1, 1, 1], [3, 4, 5])


def test_align_paired_by_prompt_id():
    a, b, keys = align_paired({"p2": 2.0, "p1": 1.0, "p9": 0.0}, {"p1": 10.0, "p2": 20.0})
    assert keys == ["p1", "p2"] and a.tolist() == [1.0, 2.0] and b.tolist() == [10.0, 20.0]


# ---- paired, clustered bootstrap ---------------------------------------------------------------

def _scipy_paired(c, b, fn, n_resamples):
    return stats.bootstrap((c, b), lambda x, y, axis: fn(np.mean(x, axis=axis), np.mean(y, axis=axis)),
                           paired=True, vectorized=True, method="percentile", n_resamples=n_resamples,
                           random_state=0).confidence_interval


@pytest.mark.parametrize("statistic, fn", [("mean_difference", lambda c, b: c - b),
                                           ("relative_difference", lambda c, b: (c - b) / np.abs(b))])
def test_paired_bootstrap_matches_scipy_paired_percentile(statistic, fn):
    rng = np.random.default_rng(5)
    b = rng.gamma(2.0, 1.0, size=80)
    c = 0.8 * b + rng.normal(scale=0.3, size=80)
    res = paired_bootstrap_ci(c, b, statistic=statistic, n_resamples=20_000, seed=1)
    ref = _scipy_paired(c, b, fn, 20_000)
    assert res.estimate == pytest.approx(fn(c.mean(), b.mean()))
    assert (res.n, res.n_clusters, res.statistic) == (80, 1, statistic)
    # Same method, independent draws: each end agrees to Monte-Carlo error. With 20k resamples an
    # end's standard error is ~0.5 % of the width; 3 % of the width is > 4 standard errors.
    width = ref.high - ref.low
    assert res.ci_low == pytest.approx(ref.low, abs=0.03 * width)
    assert res.ci_high == pytest.approx(ref.high, abs=0.03 * width)
    assert paired_bootstrap_ci(c, b, n_resamples=500, seed=3) == paired_bootstrap_ci(c, b, n_resamples=500, seed=3)


def test_two_stage_bootstrap_hand_computed_two_clusters():
    # Cluster "s0": 10 rows with difference 0; cluster "s1": 30 rows with difference 1. Rows are
    # constant within a cluster, so only stage 1 matters: clusters drawn (s0,s0) p=1/4 → 0,
    # (s0,s1) p=1/2 → 30/40 = 0.75 (the pooled rows weigh equally), (s1,s1) p=1/4 → 1.
    base = np.zeros(40)
    cand = np.r_[np.zeros(10), np.ones(30)]
    seeds = np.r_[np.zeros(10, int), np.ones(30, int)]
    wide = paired_bootstrap_ci(cand, base, clusters=seeds, n_resamples=10_000, seed=0)
    assert wide.estimate == pytest.approx(0.75)
    assert (wide.ci_low, wide.ci_high) == (0.0, 1.0)  # 2.5 % / 97.5 % fall in the p=1/4 atoms
    assert wide.n_clusters == 2 and "two-stage" in wide.method
    mid = paired_bootstrap_ci(cand, base, clusters=seeds, confidence=0.4, n_resamples=10_000, seed=0)
    assert (mid.ci_low, mid.ci_high) == (0.75, 0.75)  # 30 % / 70 % fall in the p=1/2 atom
    # Ignoring the clusters treats the 40 rows as independent: a much narrower interval.
    flat = paired_bootstrap_ci(cand, base, n_resamples=10_000, seed=0)
    assert flat.ci_high - flat.ci_low < 0.4 * (wide.ci_high - wide.ci_low)


def _coverage(n_sims: int, clustered: bool, rng) -> float:
    hits = 0
    for i in range(n_sims):
        seed_effect = np.repeat(rng.normal(size=16), 5)  # 16 seeds × 5 samples, ICC 0.5
        base = rng.normal(size=80)
        cand = base + 0.3 + seed_effect + rng.normal(size=80)
        r = paired_bootstrap_ci(cand, base, clusters=np.repeat(np.arange(16), 5) if clustered else None,
                                n_resamples=1000, seed=i)
        hits += r.ci_low <= 0.3 <= r.ci_high
    return hits / n_sims


def test_paired_bootstrap_coverage_near_nominal():
    rng = np.random.default_rng(0)
    hits = 0
    for i in range(200):
        base = rng.normal(size=40)
        cand = base + 0.3 + rng.normal(scale=0.5, size=40)
        r = paired_bootstrap_ci(cand, base, n_resamples=1000, seed=i)
        hits += r.ci_low <= 0.3 <= r.ci_high
    assert 0.90 <= hits / 200 <= 0.99
    # With a seed-level effect, resampling clusters keeps coverage near nominal (percentile
    # intervals from 16 clusters run a little short); treating rows as independent does not.
    clustered, flat = _coverage(200, True, np.random.default_rng(1)), _coverage(200, False, np.random.default_rng(1))
    assert clustered >= 0.86
    assert flat <= 0.84 and clustered - flat >= 0.08


def test_recovered_fraction_is_a_ratio_of_means_resampled_jointly():
    rng = np.random.default_rng(2)
    target = rng.gamma(2.0, 0.01, size=60)           # FD-5 cache error
    baseline = target + rng.gamma(2.0, 0.02, size=60)  # λ = 0 control at FD-10
    cand = baseline - 0.4 * (baseline - target)       # FCR closes 40 % of every sample's gap
    r = recovered_fraction_ci(cand, baseline, target, clusters=np.repeat([0, 1, 2], 20), n_resamples=2000)
    # The same rows enter numerator and denominator of every resample, so the ratio stays 0.4.
    assert (r.estimate, r.ci_low, r.ci_high) == pytest.approx((0.4, 0.4, 0.4))
    noisy = cand + rng.normal(scale=0.01, size=60)
    r2 = recovered_fraction_ci(noisy, baseline, target, n_resamples=4000)
    expected = (baseline.mean() - noisy.mean()) / (baseline.mean() - target.mean())
    assert r2.estimate == pytest.approx(expected)
    assert recovered_fraction(noisy.mean(), baseline.mean(), target.mean()) == pytest.approx(expected)
    assert r2.ci_low < expected < r2.ci_high and r2.statistic == "recovered_fraction"
    # A higher-is-better metric (e.g. class agreement) gives the same fraction.
    assert recovered_fraction(-0.03, -0.05, -0.01) == pytest.approx(recovered_fraction(0.03, 0.05, 0.01))


def test_paired_bootstrap_bad_input():
    with pytest.raises(ValueError, match="differ in length"):
        paired_bootstrap_ci([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="statistic 'median_ratio' not supported"):
        paired_bootstrap_ci([1.0, 2.0], [1.0, 2.0], statistic="median_ratio")
    with pytest.raises(ValueError, match="one label"):
        paired_bootstrap_ci([1.0, 2.0], [1.0, 2.0], clusters=[0])
    with pytest.raises(ValueError, match="undefined in every resample"):
        recovered_fraction_ci([1.0, 2.0], [1.0, 2.0], [1.0, 2.0], n_resamples=200)


def test_the_clustered_interval_from_summaries_is_the_two_stage_bootstrap_of_the_samples():
    """The one interval rule of a per-sample mean (report and explorer): from per-seed (n, mean,
    variance) alone it reproduces the two-stage percentile bootstrap over the raw samples, and it
    widens with the spread between seeds, which an interval treating samples as independent misses."""
    from fcr_eval.analysis.stats import (
        cluster_summaries,
        clustered_interval,
        clustered_mean_ci,
        paired_bootstrap_ci,
    )

    rng = np.random.default_rng(3)
    seeds = np.repeat(np.arange(4), 200)
    values = rng.normal(0, 1, seeds.size) + np.array([0.0, 0.8, -0.5, 0.3])[seeds]
    raw = paired_bootstrap_ci(values, np.zeros_like(values), clusters=seeds, n_resamples=4000, seed=1)
    est, lo, hi = clustered_interval(*cluster_summaries(values, seeds), n_resamples=4000, seed=1)
    assert est == pytest.approx(raw.estimate)
    assert lo == pytest.approx(raw.ci_low, abs=0.05) and hi == pytest.approx(raw.ci_high, abs=0.05)
    assert clustered_mean_ci(values, seeds, n_resamples=4000, seed=1) == (est, lo, hi)
    naive = 1.96 * values.std(ddof=1) / np.sqrt(values.size)
    assert (hi - lo) / 2 > 3 * naive  # the seeds' spread is in it
    same = values - np.array([0.0, 0.8, -0.5, 0.3])[seeds]  # no seed effect left: near the naive width
    _, lo2, hi2 = clustered_interval(*cluster_summaries(same, seeds), n_resamples=4000, seed=1)
    assert (hi2 - lo2) / 2 == pytest.approx(naive, rel=0.35)
    assert clustered_interval([5], [2.0], [0.0]) == (2.0, 2.0, 2.0)
    assert all(np.isnan(clustered_interval([], [], [])))
