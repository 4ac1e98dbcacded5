"""Success-criteria evaluator: numbers, pass/fail and the stored verdicts."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import polars as pl
import pytest
from fcr_eval.analysis.criteria import evaluate_criteria, paired_criterion, timing_criteria
from fcr_eval.analysis.verdicts import verdict
from fcr_eval.metrics.frechet import fd_estimable
from fcr_eval.report.board import evaluate_store_criteria
from fcr_eval.spec.criteria import CriteriaConfig
from fcr_eval.store import (
    FeatureStat,
    MetricRecord,
    ResultsStore,
    RunRecord,
    RunResult,
    TimingRecord,
    make_run_id,
)

# variation: (quality FD, class agreement, sec/img, peak bytes, σ², finetune fraction)
SCENARIOS = {
    "fd-5": (10.0, 0.80, 1.00, 1000, 4.0, None),
    "fd-10": (12.0, 0.78, 0.70, 1000, 4.0, None),
    "fcr-fd-10": (10.4, 0.79, 0.68, 1010, 2.0, 0.01),
    "fd-15": (14.5, 0.75, 0.60, 1000, 5.0, None),
}
CFG = CriteriaConfig(baseline="fd-5", candidate="fcr-fd-10", no_fcr_reference="fd-10")


def _fill(store: ResultsStore, scenarios=SCENARIOS, seeds=(0, 1), n_fd: int = 2000):
    """Runs as the runner stores them; the FD comes from ``n_fd`` samples (above the extractor's
    1280 dimensions by default, so that the FD-based verdict is decisive)."""
    for v, (q, a, sec, mem, s2, ft) in scenarios.items():
        for seed in seeds:
            jitter = 0.01 * seed
            run = RunRecord(make_run_id("exp", v, seed, {}), "exp", v, seed, "m", "d", "fd", "ddim", 28, 20, 1.0)
            # as metrics.quality writes an FD record: with its estimability decided by fd_estimable
            fd_details = {"feature_dim": 1280, "estimable": fd_estimable(n_fd, 1280)}
            metrics = [MetricRecord("fd_efficientnet_lite0", q + jitter, "efficientnet_lite0", "p", n_fd, fd_details),
                       MetricRecord("class_agreement", a, "fashion_mnist_cnn", "p", 100)]
            if ft is not None:
                metrics.append(MetricRecord("finetune_compute_fraction", ft, "none", "none", 1))
            store.write_run(RunResult(
                run, metrics=metrics,
                timings=[TimingRecord(1, sec, peak_memory_bytes=mem, memory_kind="process_rss", device="cpu")],
                feature_stats=[FeatureStat("all", d, s2 * d / 2, 8) for d in (1, 2, 3)]))


def test_criteria_values_and_verdicts(tmp_path):
    store = ResultsStore(tmp_path / "s.duckdb")
    _fill(store)
    rows = evaluate_store_criteria(store, "exp", CFG)
    assert store.criteria("exp").height == 0  # the board writes nothing; its caller keeps the verdicts
    store.write_criteria(rows)
    res = {r.criterion: r for r in rows}
    assert res["quality_delta"].value == pytest.approx((10.405 - 10.005) / 10.005) and res["quality_delta"].passed
    assert res["alignment_delta"].value == pytest.approx(-0.0125) and res["alignment_delta"].passed
    assert res["speedup"].value == pytest.approx(1 / 0.68) and res["speedup"].passed
    assert res["extra_memory"].value == pytest.approx(0.01) and res["extra_memory"].passed
    assert res["variance_reduction"].value == pytest.approx(0.5) and res["variance_reduction"].passed
    assert res["finetune_compute"].value == pytest.approx(0.01) and res["finetune_compute"].passed
    r2 = res["variance_quality_r2"]
    assert r2.details["variations"] == ["fcr-fd-10", "fd-10", "fd-15", "fd-5"] and 0 <= r2.value <= 1
    stored = store.criteria("exp")
    assert stored.height == 7
    d = json.loads(stored.filter(stored["criterion"] == "speedup")["details"][0])
    assert d["baseline"]["n_seeds"] == 2 and d["config"]["min_speedup"] == 1.4


def test_failing_and_missing_criteria(tmp_path):
    bad = dict(SCENARIOS)
    bad["fcr-fd-10"] = (11.0, 0.70, 0.90, 1100, 3.5, None)
    store = ResultsStore(tmp_path / "s.duckdb")
    _fill(store, bad, seeds=(0,))
    rows = evaluate_store_criteria(store, "exp", CFG)
    store.write_criteria(rows)
    res = {r.criterion: r for r in rows}
    for c in ("quality_delta", "alignment_delta", "speedup", "extra_memory", "variance_reduction"):
        assert res[c].passed is False, c
    assert res["finetune_compute"].passed is None and "no finetune_compute_fraction" in res["finetune_compute"].details["reason"]
    stored = store.criteria("exp")
    assert stored.filter(stored["criterion"] == "finetune_compute")["passed"].to_list() == [None]


def test_unsound_verdicts_become_inconclusive(tmp_path):
    """A quality delta from FDs of fewer samples than feature dimensions, and an R² whose
    correlation is not significant, cannot PASS or FAIL: INCONCLUSIVE with the reason."""
    store = ResultsStore(tmp_path / "s.duckdb")
    _fill(store, n_fd=100)
    res = {r.criterion: r for r in evaluate_store_criteria(store, "exp", CFG)}
    q = res["quality_delta"]
    assert (q.verdict, q.passed) == ("INCONCLUSIVE", None)
    assert "100 samples per run in 1280 dimensions" in q.details["reason"]
    assert q.value == pytest.approx((10.405 - 10.005) / 10.005)  # the number is still reported
    r2 = res["variance_quality_r2"]  # 4 points of SCENARIOS: p ≈ 0.2
    assert r2.details["p_value"] > 0.05
    assert (r2.verdict, r2.passed) == ("INCONCLUSIVE", None) and "not significant" in r2.details["reason"]


def test_r2_needs_three_variations():
    empty = pl.DataFrame()
    res = {r.criterion: r for r in evaluate_criteria("exp", CFG, metrics=empty, timings=empty, feature_stats=empty)}
    assert all(r.passed is None for r in res.values())
    assert "≥ 3 variations" in res["variance_quality_r2"].details["reason"]


# ---- verdicts with confidence intervals ------------------------------------------------------------

def test_verdict_pass_fail_inconclusive_both_directions():
    assert verdict(1.45, 1.60, 1.4, "at_least") == "PASS"
    assert verdict(1.40, 1.60, 1.4, "at_least") == "PASS"  # ≥ includes the threshold
    assert verdict(1.10, 1.39, 1.4, "at_least") == "FAIL"
    assert verdict(1.26, 1.63, 1.4, "at_least") == "INCONCLUSIVE"
    assert verdict(-0.01, 0.02, 0.02, "at_most") == "PASS"
    assert verdict(0.021, 0.05, 0.02, "at_most") == "FAIL"
    assert verdict(-0.013, 0.066, 0.02, "at_most") == "INCONCLUSIVE"
    with pytest.raises(ValueError, match="direction"):
        verdict(0, 1, 0.5, "above")
    with pytest.raises(ValueError, match="ci_low"):
        verdict(1, 0, 0.5, "at_most")


def test_paired_criterion_inconclusive_when_ci_straddles_threshold():
    rng = np.random.default_rng(0)
    seeds = np.repeat([0, 1, 2], 50)
    base = rng.binomial(1, 0.80, size=150).astype(float)  # per-sample class agreement of FD-5
    flip = rng.random(150) < 0.05
    cand = np.where(flip, 1 - base, base)                 # FCR-FD-10: a few samples change class
    r = paired_criterion("exp", "alignment_delta", cand, base, threshold=-0.02, direction="at_least", clusters=seeds,
                         n_resamples=4000)
    assert r.ci_low < -0.02 < r.ci_high  # the data cannot tell ≥ −2 % from < −2 %
    assert r.verdict == "INCONCLUSIVE" and r.passed is None and r.value == pytest.approx(
        (cand.mean() - base.mean()) / base.mean())
    assert r.details["verdict"] == "INCONCLUSIVE" and r.details["n_clusters"] == 3
    # The same contrast with a clear drop fails; with no change at all it passes.
    worse = paired_criterion("exp", "alignment_delta", base * (rng.random(150) < 0.7), base, threshold=-0.02,
                             direction="at_least", clusters=seeds, n_resamples=2000)
    same = paired_criterion("exp", "alignment_delta", base, base, threshold=-0.02, direction="at_least",
                            n_resamples=2000)
    assert (worse.verdict, worse.passed) == ("FAIL", False) and (same.verdict, same.passed) == ("PASS", True)


def _interleaved(base_sec: float, cand_sec: float, noise: float, seeds=(0, 1), repeats=6, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for s in seeds:
        for r in range(repeats):
            drift = rng.normal(scale=noise)  # a slow spell of the machine hits both of one repeat
            for v, sec, mem in (("fd-5", base_sec, 1000), ("fcr-fd-10", cand_sec, 1010)):
                rows.append({"variation_id": v, "seed": s, "repeat": r, "batch_size": 1, "device": "cpu",
                             "sec_per_image": sec * (1 + drift) * (1 + rng.normal(scale=noise / 4)),
                             "peak_memory_bytes": mem + int(rng.integers(0, 3)), "memory_kind": "process_rss"})
    return pl.DataFrame(rows)


def test_speedup_from_repeated_interleaved_timings_gets_a_ci():
    t = _interleaved(1.0, 0.6, noise=0.2)
    res = {r.criterion: r for r in timing_criteria("exp", CFG, t, n_resamples=4000)}
    sp = res["speedup"]
    b, c = t.filter(pl.col("variation_id") == "fd-5"), t.filter(pl.col("variation_id") == "fcr-fd-10")
    assert sp.value == pytest.approx(b["sec_per_image"].mean() / c["sec_per_image"].mean())
    assert sp.ci_low < sp.value < sp.ci_high and sp.ci_low > 1.4
    assert sp.verdict == "PASS" and sp.details["n_repeats"] == 12 and sp.details["n_clusters"] == 2
    mem = res["extra_memory"]
    assert mem.ci_low <= mem.value <= mem.ci_high and mem.verdict == "PASS"  # +1 % ± bytes of noise
    # A speed-up whose interval reaches below 1.4 is not called PASS from its point value.
    close = {r.criterion: r for r in timing_criteria("exp", CFG, _interleaved(1.0, 0.7, noise=0.3, seed=3),
                                                      n_resamples=4000)}["speedup"]
    assert close.ci_low < 1.4 < close.ci_high and close.verdict == "INCONCLUSIVE"
    # evaluate_criteria takes the CI path when the timings carry repeats.
    empty = pl.DataFrame()
    via = {r.criterion: r for r in evaluate_criteria("exp", CFG, metrics=empty, timings=t, feature_stats=empty)}
    assert via["speedup"].ci_low is not None and via["speedup"].verdict == "PASS"
    with pytest.raises(ValueError, match="missing \\['repeat'\\]"):
        timing_criteria("exp", CFG, t.drop("repeat"))


def test_holm_with_one_criterion_is_the_plain_verdict_and_controls_the_family():
    from fcr_eval.analysis.verdicts import holm_verdicts

    for est, lo, hi, thr, d in [(1.6, 1.5, 1.7, 1.4, "at_least"), (1.3, 1.2, 1.35, 1.4, "at_least"),
                                (0.01, -0.01, 0.03, 0.02, "at_most"), (0.05, 0.03, 0.07, 0.02, "at_most")]:
        assert holm_verdicts([(est, lo, hi, thr, d)]) == [verdict(lo, hi, thr, d)]
    # Ten criteria whose true value sits on the threshold: every PASS or FAIL is wrong. Unadjusted,
    # some verdict of the ten is wrong ~40 % of the time (1 − 0.95^10); Holm keeps it near ≤ 5 %.
    rng = np.random.default_rng(0)
    wrong_plain = wrong_holm = 0
    reps = 2000
    for _ in range(reps):
        est = rng.normal(0.0, 1.0, 10)
        family = [(e, e - 1.96, e + 1.96, 0.0, "at_least") for e in est]
        wrong_plain += any(verdict(lo, hi, t, d) != "INCONCLUSIVE" for _, lo, hi, t, d in family)
        wrong_holm += any(v != "INCONCLUSIVE" for v in holm_verdicts(family))
    assert 0.33 < wrong_plain / reps < 0.47
    assert wrong_holm / reps <= 0.05 + 3 * (0.05 * 0.95 / reps) ** 0.5


def test_holm_reads_a_t_interval_at_its_degrees_of_freedom():
    """A t interval over 3 clusters (2 df) is 2.2× wider than a normal one for the same se. Read
    as normal, an interval that just excludes the threshold would give p far below α/2 and Holm
    would pass it in a family where the t reading (the interval's own) does not; with its df the
    one-criterion verdict is the interval's own at any df."""
    from fcr_eval.analysis.verdicts import holm_verdicts
    from fcr_eval.report.board import interval_df
    from scipy import stats as st

    for df in (2, 5, 30):
        q = st.t.ppf(0.975, df)
        for margin, expected in ((1.01, "PASS"), (0.99, "INCONCLUSIVE")):
            est = margin * q  # se = 1, threshold 0: the interval's low end at ±1 % of the threshold
            assert holm_verdicts([(est, est - q, est + q, 0.0, "at_least", df)]) == [expected]
    # a family of two at 2 df: the t reading keeps the α/2 claim of each at α/4 and leaves this
    # one undecided (p = 0.018 > α/3; the normal reading of the same interval gives p = 0.009: PASS)
    q = st.t.ppf(0.975, 2)
    pair = [(1.2 * q, 0.2 * q, 2.2 * q, 0.0, "at_least"), (10.0, 9.0, 11.0, 0.0, "at_least")]
    assert holm_verdicts([(*pair[0], 2), (*pair[1], None)]) == ["INCONCLUSIVE", "PASS"]
    assert holm_verdicts(pair) == ["PASS", "PASS"]
    assert interval_df({"method": "fieller (G-1 df)", "n_clusters": 9}) == 8
    assert interval_df({"method": "paired-t (n-1 df); sampling noise only", "n_samples": 60}) == 59
    assert interval_df({"method": "cluster bootstrap", "n_clusters": 9}) is None


def test_board_marks_method_claims_from_a_shared_finetune_inconclusive_and_records_the_family(tmp_path):
    from fcr_eval.spec.vocabulary import INDEPENDENT_FINETUNES, SHARED_FINETUNE

    store = ResultsStore(tmp_path / "s.duckdb")
    _fill(store)
    independent = {r.criterion: r for r in evaluate_store_criteria(store, "exp", CFG,
                                                                   replication=lambda s: INDEPENDENT_FINETUNES)}
    shared = {r.criterion: r for r in evaluate_store_criteria(store, "exp", CFG,
                                                              replication=lambda s: SHARED_FINETUNE)}
    for name in ("quality_delta", "alignment_delta", "variance_reduction"):
        assert independent[name].verdict in ("PASS", "FAIL")
        assert shared[name].verdict == "INCONCLUSIVE" and "shared by every seed" in shared[name].details["reason"]
    assert shared["speedup"].verdict == independent["speedup"].verdict  # timing is not about the weights
    assert all("family_size" in r.details and r.details["family_adjustment"] == "none" for r in shared.values())
    holm = dataclasses.replace(CFG, family_adjustment="holm")
    adjusted = evaluate_store_criteria(store, "exp", holm)
    assert any(r.details.get("family_adjustment") == "holm" for r in adjusted)
    with pytest.raises(ValueError, match="family_adjustment"):
        dataclasses.replace(CFG, family_adjustment="bonferroni-ish")
