"""Statistics against scipy and closed forms."""

from __future__ import annotations

import numpy as np
import pytest
from fcr_eval.stats import align_paired, bootstrap_paired_ci, mean_ci, paired_t_test, pearson_r2
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
