"""The statistics against hand-computed figures, and the analysis tables written to the study."""

from __future__ import annotations

import math

import numpy as np
import pytest
from fcr_human_study.analysis import (
    analyse_votes,
    bradley_terry,
    fleiss_kappa,
    krippendorff_alpha_nominal,
    wilson_interval,
    win_rates,
)
from scipy import stats


def test_wilson_interval_matches_hand_computation():
    # 8 of 10, z = 1.959964: centre (0.8 + z²/20) / (1 + z²/10), half-width z·sqrt(p(1-p)/n + z²/4n²)/(1 + z²/n)
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.49016, abs=1e-4)
    assert hi == pytest.approx(0.94332, abs=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0
    assert all(math.isnan(x) for x in wilson_interval(0, 0))


def test_win_rates_exclude_ties_from_rate_and_test():
    votes = ([("fd10", "fd5", "b")] * 8 + [("fd10", "fd5", "a")] * 2
             + [("fd10", "fd5", "tie")] * 5 + [("fd5", "fd10", "both_bad")] * 3)
    (r,) = win_rates(votes)
    # Canonical order: variation_a is the alphabetically first name ("fd10" < "fd5").
    assert (r.variation_a, r.variation_b) == ("fd10", "fd5")
    assert (r.n_a, r.n_b, r.n_tie, r.n_both_bad) == (2, 8, 5, 3)
    assert r.win_rate_a == pytest.approx(0.2)
    # Two-sided exact test of 2 of 10: 2·(C(10,0)+C(10,1)+C(10,2))/2¹⁰ = 112/1024.
    assert r.p_value == pytest.approx(112 / 1024)
    assert r.p_value == pytest.approx(stats.binomtest(2, 10, 0.5).pvalue)
    assert (r.ci_low, r.ci_high) == pytest.approx((1 - 0.94332, 1 - 0.49016), abs=1e-4)


def test_win_rates_flip_choices_of_pairs_stored_the_other_way_round():
    (r,) = win_rates([("y", "x", "a")] * 3 + [("x", "y", "a")])
    assert (r.variation_a, r.n_a, r.n_b) == ("x", 1, 3)


def test_bradley_terry_recovers_known_strengths():
    # Data equal to their expectation under p = (4, 2, 1) satisfy the likelihood equations
    # W_i = Σ_j n_ij p_i / (p_i + p_j) exactly, so the MLE is p ∝ (4, 2, 1).
    wins = np.array([[0, 4, 4],
                     [2, 0, 2],
                     [1, 1, 0]])
    p = bradley_terry(wins)
    assert p == pytest.approx(np.array([4, 2, 1]) / 7, abs=1e-8)
    # Two players: p1 / p2 is the ratio of wins.
    assert bradley_terry(np.array([[0, 9], [3, 0]])) == pytest.approx([0.75, 0.25])


def test_krippendorff_alpha_on_krippendorffs_example():
    # Krippendorff (2011), "Computing Krippendorff's alpha-reliability", nominal example:
    # 4 observers, 12 units, missing values; alpha = 0.743.
    obs = [
        [1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None],
        [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3],
        [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None],
        [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None],
    ]
    units = [[o[u] for o in obs if o[u] is not None] for u in range(12)]
    assert krippendorff_alpha_nominal(units) == pytest.approx(0.743, abs=5e-4)
    assert krippendorff_alpha_nominal([["a", "a"], ["b", "b", "b"]]) == pytest.approx(1.0)


def test_fleiss_kappa_on_the_textbook_example():
    # Fleiss' kappa worked example (10 subjects, 14 raters, 5 categories): kappa = 0.210.
    counts = np.array([
        [0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
        [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7],
    ])
    assert fleiss_kappa(counts) == pytest.approx(0.2099, abs=1e-3)


def _vote(rater, pair, a, b, choice, attention=False, expected=None):
    return {"rater_id": rater, "pair_id": pair, "variation_a": a, "variation_b": b,
            "is_attention": attention, "expected": expected, "choice": choice}


def test_raters_failing_attention_checks_are_excluded():
    votes = []
    for r in ("good1", "good2"):
        votes += [_vote(r, f"p{i}", "x", "y", "a") for i in range(6)]
        votes.append(_vote(r, "att1", "x", "broken", "a", True, "a"))
    # "bad" always picks b and fails its attention check.
    votes += [_vote("bad", f"p{i}", "x", "y", "b") for i in range(6)]
    votes.append(_vote("bad", "att1", "x", "broken", "b", True, "a"))
    votes.append(_vote("unchecked", "p0", "x", "y", "a"))
    a = analyse_votes(votes, n_bootstrap=50, study_id="s")
    assert set(a.excluded_raters) == {"bad"}
    assert a.excluded_raters["bad"] == (0, 1)
    (r,) = a.win_rates
    assert (r.n_a, r.n_b) == (13, 0)  # 12 from good raters + 1 from the unchecked rater
    assert a.n_votes_used == 13
    assert a.details["raters_without_attention_checks"] == ["unchecked"]
    # The kept raters all chose "a": one category only, so alpha is undefined (no variation).
    assert math.isnan(a.krippendorff_alpha)
    assert a.n_items_agreement == 6


def test_bt_scores_and_bootstrap_cis_order_variations():
    rng = np.random.default_rng(1)
    votes = []
    strength = {"best": 4.0, "mid": 2.0, "worst": 1.0}
    names = list(strength)
    for i in range(600):
        x, y = rng.choice(names, size=2, replace=False)
        win_x = rng.random() < strength[x] / (strength[x] + strength[y])
        votes.append(_vote(f"r{i % 10}", f"p{i}", x, y, "a" if win_x else "b"))
    a = analyse_votes(votes, n_bootstrap=200, seed=0)
    scores = dict(zip(a.variations, a.bt_scores, strict=True))
    assert scores["best"] > scores["mid"] > scores["worst"]
    assert sum(a.bt_scores) == pytest.approx(0.0, abs=1e-9)
    for name, lo, hi in zip(a.variations, a.bt_ci_low, a.bt_ci_high, strict=True):
        assert lo < scores[name] < hi
    # log(4) - log(1) ≈ 1.386 lies inside a generous band around the estimate.
    assert scores["best"] - scores["worst"] == pytest.approx(math.log(4), abs=0.35)


def test_analysis_tables_written_to_the_study_file(results_store, tmp_path):
    from fcr_human_study.analysis import analyse_study, write_analysis
    from fcr_human_study.build import add_raters, build_study
    from fcr_human_study.rating import RatingService
    from fcr_human_study.store import StudyStore

    study = tmp_path / "s.duckdb"
    build_study(results_store, study, n_pairs=20, attention_share=0.1, pairs_per_rater=20)
    service = RatingService(StudyStore(study, idle_close_s=1.0))  # as `serve` runs it
    for _, token in add_raters(study, 3):
        rater = service.rater_for_token(token)
        while (p := service.current(rater)) is not None:
            service.vote(rater, p.token, "left")
    a = analyse_study(service.store, n_bootstrap=20)
    write_analysis(service.store, a)
    write_analysis(service.store, a)  # re-analysing replaces, never duplicates
    rows = service.store.query_dicts("SELECT * FROM human_study_results ORDER BY variation_a, variation_b")
    assert [(r["variation_a"], r["variation_b"], r["n_a"], r["n_b"]) for r in rows] == [
        (w.variation_a, w.variation_b, w.n_a, w.n_b) for w in a.win_rates]
    assert sum(r["n_a"] + r["n_b"] + r["n_tie"] + r["n_both_bad"] for r in rows) == a.n_votes_used
    assert all(r["p_value"] == pytest.approx(stats.binomtest(r["n_a"], r["n_a"] + r["n_b"]).pvalue)
               for r in rows)
    scores = service.store.query("SELECT variation, bt_score FROM human_study_scores ORDER BY variation")
    assert [v for v, _ in scores] == a.variations
    (summary,) = service.store.query_dicts("SELECT * FROM human_study_summary")
    assert summary["n_votes"] == 60 and summary["n_raters"] == 3
    service.store.close()
