"""Inference at the unit of replication: coverage with a known truth, cluster-level widths,
precision plans in fine-tunes, and the sampling-noise-only label of a shared fine-tune."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from fcr_eval.analysis.replication import (
    NOISE_FINETUNES,
    NOISE_SAMPLING,
    CoverageConfig,
    VarianceComponents,
    plan_precision,
    replication_interval,
    simulate_coverage,
    variance_components,
)
from fcr_eval.analysis.stats import (
    mean_ci,
    paired_t_test,
    recovered_fraction,
    recovered_fraction_ci,
)

# --- (a) coverage is a tested property ------------------------------------------------------------
# 2000 replications: the Monte Carlo SE of a 0.95 coverage is sqrt(.95 * .05 / 2000) = 0.0049. The
# band 0.92-0.98 is +-6 SE: a correct interval leaves it only if MC noise exceeds 6 SE (p ~ 1e-9)
# or its true coverage is off by more than ~1.3 points beyond a 3.5-SE draw; the two-stage
# bootstrap at G = 6 (0.89, issue 17) or a sampling-noise-only interval under a cluster effect
# (~0.5) fall well outside. The whole grid takes ~2 s on the 2-core box.
REPS, LOW, HIGH = 2000, 0.92, 0.98
REPORTED = {"mean_difference": ["cluster-t (G-1 df)"],
            "recovered_fraction": ["fieller (G-1 df)", "cluster-delta (G-1 df)"]}
GRID = list(itertools.product((3, 6, 10), (True, False), ("mean_difference", "recovered_fraction"),
                              ("normal", "lognormal")))


@pytest.mark.parametrize(("g", "effect", "statistic", "distribution"), GRID)
def test_reported_intervals_cover_at_nominal_rate(g, effect, statistic, distribution):
    res = simulate_coverage(CoverageConfig(n_clusters=g, cluster_effect=effect, statistic=statistic,
                                           distribution=distribution, reps=REPS, seed=100 + g))
    for name in REPORTED[statistic]:
        m = res.get(name)
        assert LOW <= m.coverage <= HIGH, (name, m)
        assert m.n_unbounded == 0 and math.isfinite(m.mean_width)
    naive = next(m for m in res.methods if m.method.endswith(NOISE_SAMPLING))
    if effect:  # the simulated fine-tune effect is real: ignoring it must under-cover badly
        assert naive.coverage < 0.75, naive
    else:  # without it, samples are independent and the sampling-noise interval is right and narrower
        assert LOW <= naive.coverage <= HIGH and naive.mean_width < res.get(REPORTED[statistic][0]).mean_width


def test_two_stage_bootstrap_under_covers_at_three_fine_tunes():
    """The comparison the module replaces (issue 17: 0.80 at G = 3); 120 reps, MC SE ~0.037."""
    def boot(c, b, t, clusters):
        r = recovered_fraction_ci(c, b, t, clusters=clusters, n_resamples=200)
        return r.ci_low, r.ci_high

    res = simulate_coverage(CoverageConfig(n_clusters=3, reps=120, seed=7), extra_intervals={"boot": boot},
                            extra_reps=120)
    assert res.get("boot").coverage < 0.9 < res.get("fieller (G-1 df)").coverage


# --- (b) independent fine-tunes with a large between-seed spread ----------------------------------

def _seeds_profile_like(rng, m=100):
    """Three fine-tunes whose FCR effect differs (per-seed cache MSE like the seeds profile's table)."""
    base_mse = {0: (0.0121, 0.0235, 0.0193), 1: (0.0108, 0.0231, 0.0231), 2: (0.0110, 0.0230, 0.0233)}
    c, b, t, seeds = [], [], [], []
    for s, (fd5, fd10, fcr) in base_mse.items():
        difficulty = rng.lognormal(0.0, 0.5, m)  # per-sample, shared by the three arms (paired)
        difficulty /= difficulty.mean()
        t.append(fd5 * difficulty * rng.lognormal(0, 0.1, m))
        b.append(fd10 * difficulty * rng.lognormal(0, 0.1, m))
        c.append(fcr * difficulty * rng.lognormal(0, 0.1, m))
        seeds += [s] * m
    return np.concatenate(c), np.concatenate(b), np.concatenate(t), np.array(seeds)


def _cluster_t(c, b, t, seeds, statistic):
    """The t-interval over per-seed estimates (2 df), computed here independently of the module."""
    means = [(c[seeds == s].mean(), b[seeds == s].mean(), t[seeds == s].mean()) for s in np.unique(seeds)]
    per = ([recovered_fraction(cm, bm, tm) for cm, bm, tm in means] if statistic == "recovered_fraction"
           else [cm - bm for cm, bm, _ in means])
    return per, mean_ci(per)


@pytest.mark.parametrize(("statistic", "equal_gaps"), [("mean_difference", False), ("recovered_fraction", True)])
def test_independent_fine_tunes_give_at_least_the_cluster_t_width(statistic, equal_gaps):
    c, b, t, seeds = _seeds_profile_like(np.random.default_rng(3))
    if equal_gaps:  # every fine-tune's gap b̄ − t̄ the same: the spread is all in the FCR effect
        for s in range(3):
            t[seeds == s] += (b[seeds == s] - t[seeds == s]).mean() - 0.012
    target = t if statistic == "recovered_fraction" else None
    r = replication_interval(c, b, target, clusters=seeds, statistic=statistic)
    per, ref = _cluster_t(c, b, t, seeds, statistic)
    assert r.noise == NOISE_FINETUNES and r.n_clusters == 3 and r.n_per_cluster == (100, 100, 100)
    np.testing.assert_allclose(r.cluster_estimates, per, rtol=1e-12)
    assert r.high - r.low >= (ref.high - ref.low) * (1 - 1e-9)
    shared = replication_interval(c, b, target, clusters=seeds, statistic=statistic, independent_finetunes=False)
    assert r.high - r.low > 3 * (shared.high - shared.low)  # fine-tune spread dominates sampling noise
    assert r.components.between > r.components.within / 100


def test_recovered_fraction_with_unequal_gaps_keeps_the_fine_tune_spread():
    """With gaps that differ by seed (as in the seeds profile) the ratio of cluster means weighs a
    fine-tune by its gap, so Fieller's width may differ a little from the t over per-seed ratios
    (both estimate the same recovered fraction to first order); it must stay that wide within 5 %
    and far wider than the two-stage bootstrap (issue 17: 2.5× narrower at G = 3)."""
    c, b, t, seeds = _seeds_profile_like(np.random.default_rng(3))
    r = replication_interval(c, b, t, clusters=seeds, statistic="recovered_fraction")
    _, ref = _cluster_t(c, b, t, seeds, "recovered_fraction")
    boot = recovered_fraction_ci(c, b, t, clusters=seeds, n_resamples=2000)
    assert r.high - r.low >= 0.95 * (ref.high - ref.low)
    assert r.high - r.low > 2 * (boot.ci_high - boot.ci_low)


def test_fieller_bounds_solve_its_quadratic_and_go_unbounded_without_a_gap():
    rng = np.random.default_rng(5)
    num, den = rng.normal(0.3, 0.1, 6), rng.normal(1.0, 0.1, 6)  # per-cluster b − c and b − t
    b = np.full(6, 2.0)
    r = replication_interval(b - num, b, b - den, clusters=np.arange(6), statistic="recovered_fraction")
    tq2 = 2.570582 ** 2 / 6  # t_{0.975, 5}² / G
    cov = np.cov(num, den)
    for rho in (r.low, r.high):  # the Fieller bounds are the roots of (N̄ − ρD̄)² = t² v(ρ)
        lhs = (num.mean() - rho * den.mean()) ** 2
        assert lhs == pytest.approx(tq2 * (cov[0, 0] - 2 * rho * cov[0, 1] + rho**2 * cov[1, 1]), rel=1e-6)
    no_gap = replication_interval(b - num, b, b - rng.normal(0.0, 0.5, 6), clusters=np.arange(6),
                                  statistic="recovered_fraction")
    assert no_gap.unbounded and (no_gap.low, no_gap.high) == (-math.inf, math.inf)
    delta = replication_interval(b - num, b, b - den, clusters=np.arange(6), statistic="recovered_fraction",
                                 ratio_method="delta")
    assert delta.method == "cluster-delta (G-1 df)" and delta.estimate == pytest.approx(r.estimate)


# --- (c) the precision plan counts fine-tunes ----------------------------------------------------

def test_plan_recovers_the_cluster_count_from_t_tables():
    # σ²_w = 0, σ_b = 1: half-width t_{G−1}/√G; from a t table t_{.975,8} = 2.306, t_{.975,9} = 2.262,
    # so G = 9 gives 0.769 and G = 10 gives 0.715: the target 0.74 needs exactly 10 clusters.
    plan = plan_precision(VarianceComponents(1.0, 0.0, 3, 100, "mean_difference"), 0.74)
    assert plan.clusters_needed == 10 and plan.samples_needed is None
    assert plan.floor == pytest.approx(4.303 / math.sqrt(3), rel=1e-3)  # t_{.975,2} σ_b/√3
    assert "more samples at 3 fine-tunes cannot (floor ±2.5)" in plan.describe()
    # σ²_b = 0, σ²_w = 1 at 3 clusters: m = 1 / (3 (0.1 / 4.303)²) = 617.1, so 618 samples per cluster.
    plan = plan_precision(VarianceComponents(0.0, 1.0, 3, 100, "mean_difference"), 0.1)
    assert plan.samples_needed == 618 and plan.describe().endswith("or 3 fine-tunes × 618 samples")


def test_variance_components_and_plan_recover_simulated_truth():
    rng = np.random.default_rng(11)
    g, m, s2b, s2w = 2000, 20, 0.04, 0.64
    y = (rng.normal(0, math.sqrt(s2b), g)[:, None] + rng.normal(0, math.sqrt(s2w), (g, m))).ravel()
    vc = variance_components(y, np.zeros_like(y), clusters=np.repeat(np.arange(g), m))
    # SE of σ²_b from the sample variance of G cluster means: (σ²_b + σ²_w/m) √(2/(G−1)) = 0.0023
    se_b, se_w = (s2b + s2w / m) * math.sqrt(2 / (g - 1)), s2w * math.sqrt(2 / (g * (m - 1)))
    assert abs(vc.between - s2b) < 4 * se_b and abs(vc.within - s2w) < 4 * se_w
    assert vc.n_clusters == g and vc.n_per_cluster == pytest.approx(m)

    def plan(b, w):
        return plan_precision(VarianceComponents(b, w, 3, m, "mean_difference"), 0.15).clusters_needed

    lo, hi = plan(s2b - 4 * se_b, s2w - 4 * se_w), plan(s2b + 4 * se_b, s2w + 4 * se_w)
    assert lo <= plan_precision(vc, 0.15, n_clusters=3).clusters_needed <= hi and hi - lo <= 4  # 13..17 here


def test_plan_for_the_recovered_fraction_matches_simulated_half_width():
    # The normal design of CoverageConfig: per-cluster R SD τ = 0.2 (gap spread 5 %), per-sample
    # linearised value (0.4e − R·0.3e')/0.5, so σ²_b ≈ 0.04 + 0.1²·0.05² and σ²_w = (0.16 + 0.01·0.09)/0.25.
    vc = VarianceComponents(0.04 + 0.01 * 0.0025, (0.16 + 0.0009) / 0.25, 3, 100, "recovered_fraction")
    plan = plan_precision(vc, 0.15)
    assert "more samples at 3 fine-tunes cannot" in plan.describe()
    res = simulate_coverage(CoverageConfig(n_clusters=plan.clusters_needed, reps=2000, seed=1))
    simulated = res.get("fieller (G-1 df)").mean_width / 2
    assert simulated == pytest.approx(vc.half_width(plan.clusters_needed, 100), rel=0.05)
    assert simulated <= 0.15 * 1.02


# --- (d) one fine-tune shared by all seeds ------------------------------------------------------

def test_shared_fine_tune_is_labelled_sampling_noise_only():
    rng = np.random.default_rng(2)
    b = rng.lognormal(0, 0.5, 300)
    c = b * rng.lognormal(-0.1, 0.2, 300)
    seeds = np.repeat([0, 1, 2], 100)
    r = replication_interval(c, b, clusters=seeds, independent_finetunes=False)
    ref = paired_t_test(c, b)
    assert r.sampling_noise_only and r.noise == NOISE_SAMPLING
    assert r.method == "paired-t (n-1 df); sampling noise only" and NOISE_SAMPLING in r.as_text()
    assert (r.low, r.high) == pytest.approx((ref.low, ref.high), rel=1e-12)
    assert math.isnan(r.components.between)
    plan = r.plan(r.half_width / 2)  # halving a sampling-noise half-width takes ~4x the samples
    assert plan.clusters_needed is None and NOISE_SAMPLING in plan.describe()
    assert plan.current_half_width == pytest.approx(r.half_width, rel=0.02)
    assert 3.9 * 300 <= plan.samples_needed <= 4.1 * 300
    with pytest.raises(ValueError, match="needs >= 2 independent fine-tunes"):
        replication_interval(c, b, clusters=np.zeros(300))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"statistic": "median"}, "not supported"),
    ({"statistic": "recovered_fraction"}, "give target exactly"),
    ({"clusters": [0, 1]}, "one label"),
    ({"ratio_method": "bootstrap"}, "ratio_method"),
])
def test_bad_input_is_named(kwargs, message):
    args = {"clusters": [0, 0, 1, 1]} | kwargs
    with pytest.raises(ValueError, match=message):
        replication_interval([1.0, 2.0, 3.0, 4.0], [0.0, 1.0, 2.0, 3.0], **args)
