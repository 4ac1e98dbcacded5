"""Contrasts: [[contrasts]] parsed and checked at load time; paired estimates with clustered CIs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
from fcr_eval.analysis.contrasts import compute_contrast, compute_contrasts, pair_samples
from fcr_eval.analysis.replication import replication_interval
from fcr_eval.analysis.stats import mean_ci, paired_bootstrap_ci, recovered_fraction
from fcr_eval.spec.contrasts import ContrastSpec, ContrastSpecError
from fcr_eval.spec.experiment import ExperimentFileError, load_experiment
from fcr_eval.spec.vocabulary import INDEPENDENT_FINETUNES, SAME_WEIGHTS, SHARED_FINETUNE

TINY = Path(__file__).parents[1] / "experiments" / "tiny.toml"

CONTRASTS = '''
[[contrasts]]
id = "stride-gap"
kind = "difference"
metric = "cache_mse"
candidate = "fcr-0.10-fd-4"
baseline = "fd-2"

[[contrasts]]
id = "fcr-recovers"
kind = "recovered_fraction"
metric = "cache_mse"
candidate = "fcr-0.10-fd-2"
baseline = "ft-0.00-fd-2"
target = "no-cache"
threshold = 0.3
direction = "at_least"
description = "fraction of the gap FCR closes against the λ = 0 control"

[[contrasts]]
id = "full-only"
kind = "relative_difference"
metric = "class_correct"
candidate = "fcr-0.10-fd-2"
baseline = "fd-2"
profiles = ["one-seed"]
'''


def _file(tmp_path, extra: str) -> Path:
    """The tiny experiment with ``extra`` contrasts instead of its own."""
    p = tmp_path / "exp.toml"
    p.write_text(TINY.read_text().split("[[contrasts]]")[0] + extra)
    return p


def test_contrasts_load_typed_and_per_profile(tmp_path):
    path = _file(tmp_path, CONTRASTS)
    exp = load_experiment(path)
    assert [c.id for c in exp.contrasts] == ["stride-gap", "fcr-recovers"]
    rec = exp.contrasts[1]
    assert (rec.kind, rec.target, rec.threshold, rec.direction) == ("recovered_fraction", "no-cache", 0.3, "at_least")
    assert rec.variations == ("fcr-0.10-fd-2", "ft-0.00-fd-2", "no-cache")
    assert [c.id for c in load_experiment(path, "one-seed").contrasts] == ["stride-gap", "fcr-recovers", "full-only"]
    assert [c.id for c in load_experiment(TINY).contrasts] == ["tiny-stride-gap"]


def test_unknown_variation_is_a_load_time_error_naming_file_contrast_and_known_ids(tmp_path):
    path = _file(tmp_path, CONTRASTS.replace('baseline = "fd-2"\n', 'baseline = "fd-3"\n', 1))
    with pytest.raises(ExperimentFileError) as e:
        load_experiment(path)
    msg = str(e.value)
    assert str(path) in msg and "'stride-gap'" in msg and "baseline = 'fd-3'" in msg
    assert "known variation ids" in msg and "'fd-2'" in msg and "'no-cache'" in msg
    line = int(msg.split(":")[1])
    assert path.read_text().splitlines()[line - 1].strip() == 'baseline = "fd-3"'  # file:line points at the key


@pytest.mark.parametrize("change, match", [
    (('metric = "cache_mse"', 'metric = "fid"'), r"metric = 'fid' is not a per-sample metric; known: \[.*cache_mse"),
    (('target = "no-cache"\n', ""), "needs target"),
    (('direction = "at_least"', 'direction = "above"'), "direction = 'above' is not one of"),
    (('kind = "difference"', 'kind = "ratio_of_means"'), "kind = 'ratio_of_means' is not one of"),
    (('candidate = "fcr-0.10-fd-4"', 'candidate = "fd-2"'), "candidate and baseline are both 'fd-2'"),
    (('id = "full-only"', 'id = "stride-gap"\nprofiles_x = 1'), "unknown key"),
])
def test_malformed_contrasts_fail_at_load(tmp_path, change, match):
    path = _file(tmp_path, CONTRASTS.replace(*change, 1))
    with pytest.raises(ExperimentFileError, match=match):
        load_experiment(path, "one-seed")


def test_duplicate_contrast_ids(tmp_path):
    with pytest.raises(ExperimentFileError, match=r"duplicate contrast ids \['stride-gap'\]"):
        load_experiment(_file(tmp_path, CONTRASTS + CONTRASTS.split("[[contrasts]]")[1].join(["[[contrasts]]", ""])))


def _per_sample(seed: int = 0) -> pl.DataFrame:
    """Cache error of 2 seeds × 40 samples for four variations; rows shuffled, one sample unpaired."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in (0, 1):
        gap = rng.gamma(2.0, 0.02, size=40)
        small = rng.gamma(2.0, 0.005, size=40)
        vals = {"fd-5": small, "ctrl-fd-10": small + gap, "fcr-fd-10": small + 0.6 * gap + rng.normal(0, 0.002, 40)}
        for v, a in vals.items():
            rows += [{"variation_id": v, "seed": s, "sample_index": i, "metric": "cache_mse", "value": float(x)}
                     for i, x in enumerate(a)]
            rows += [{"variation_id": v, "seed": s, "sample_index": i, "metric": "class_correct", "value": 1.0}
                     for i in range(40)]
    rows.append({"variation_id": "fd-5", "seed": 1, "sample_index": 99, "metric": "cache_mse", "value": 0.5})
    return pl.DataFrame(rows).sample(fraction=1.0, shuffle=True, seed=1)


def test_difference_contrast_pairs_by_seed_and_sample_and_uses_the_interval_of_its_replication():
    df = _per_sample()
    spec = ContrastSpec("fcr-effect", "difference", "cache_mse", candidate="fcr-fd-10", baseline="ctrl-fd-10")
    p = pair_samples(df, "cache_mse", ["fcr-fd-10", "ctrl-fd-10"])
    assert p.height == 80 and p.columns == ["seed", "sample_index", "fcr-fd-10", "ctrl-fd-10"]
    for replication, independent in ((INDEPENDENT_FINETUNES, True), (SHARED_FINETUNE, False), (SAME_WEIGHTS, False)):
        r = compute_contrast(spec, df, replication=replication)
        direct = replication_interval(p["fcr-fd-10"], p["ctrl-fd-10"], clusters=p["seed"],
                                      independent_finetunes=independent)
        assert (r.estimate, r.ci_low, r.ci_high, r.method) == (direct.estimate, direct.low, direct.high, direct.method)
        assert r.details["replication"] == replication and r.noise == direct.noise
    assert (r.n_samples, r.n_clusters, r.verdict) == (80, 2, None) and r.ci_high < 0  # FCR lowers cache error
    assert r.details["candidate_mean"] == pytest.approx(p["fcr-fd-10"].mean())
    assert "fcr-effect: cache_mse fcr-fd-10 − ctrl-fd-10" in r.as_text() and "sampling noise only" in r.as_text()


def test_recovered_fraction_verdict_follows_the_replication():
    df = _per_sample()
    spec = ContrastSpec("recovered", "recovered_fraction", "cache_mse", candidate="fcr-fd-10", baseline="ctrl-fd-10",
                        target="fd-5", threshold=0.3, direction="at_least")
    same = compute_contrast(spec, df, replication=SAME_WEIGHTS)
    assert same.ci_low < 0.4 < same.ci_high and same.ci_low > 0.3 and same.verdict == "PASS"  # built to close 40 %
    assert same.details["gap"]["ci_low"] > 0 and same.n_samples == 80  # fd-5's unpaired sample 99 is dropped
    # The same numbers from weights of one fine-tune shared by both seeds: no PASS about the method.
    shared = compute_contrast(spec, df, replication=SHARED_FINETUNE)
    assert (shared.estimate, shared.ci_low, shared.ci_high) == (same.estimate, same.ci_low, same.ci_high)
    assert shared.verdict == "INCONCLUSIVE" and "sampling noise only" in shared.details["verdict_reason"]
    assert "one fine-tune per seed" in shared.details["verdict_reason"]
    strict = ContrastSpec("recovered", "recovered_fraction", "cache_mse", candidate="fcr-fd-10",
                          baseline="ctrl-fd-10", target="fd-5", threshold=0.4, direction="at_least")
    assert compute_contrast(strict, df, replication=SAME_WEIGHTS).verdict == "INCONCLUSIVE"
    assert same.details["precision"]["target_half_width"] == 0.15 and same.details["precision"]["text"]


def _spread_store(n_seeds=4, m=30, spread=0.3, seed=0):
    """Seeds that each carry their own fine-tune pair: the recovered fraction differs by seed (SD
    ``spread``), the within-seed noise is small."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n_seeds):
        frac = 0.2 + rng.normal(0, spread)
        t = rng.gamma(2.0, 0.005, size=m)
        b = t + 0.04 + rng.normal(0, 0.002, m)
        c = b - frac * 0.04 + rng.normal(0, 0.002, m)
        for v, a in (("fd-5", t), ("ctrl-fd-10", b), ("fcr-fd-10", c)):
            rows += [{"variation_id": v, "seed": s, "sample_index": i, "metric": "cache_mse", "value": float(x)}
                     for i, x in enumerate(a)]
    return pl.DataFrame(rows)


def test_independent_finetunes_give_an_interval_as_wide_as_the_t_over_seed_estimates():
    df = _spread_store()
    diff = ContrastSpec("d", "difference", "cache_mse", candidate="fcr-fd-10", baseline="ctrl-fd-10")
    r = compute_contrast(diff, df, replication=INDEPENDENT_FINETUNES)
    p = pair_samples(df, "cache_mse", ["fcr-fd-10", "ctrl-fd-10"])
    per_seed = p.group_by("seed").agg((pl.col("fcr-fd-10") - pl.col("ctrl-fd-10")).mean().alias("d"))["d"]
    t = mean_ci(per_seed.to_list())
    assert r.ci_high - r.ci_low >= (t.high - t.low) * (1 - 1e-9)
    boot = paired_bootstrap_ci(p["fcr-fd-10"], p["ctrl-fd-10"], clusters=p["seed"], n_resamples=2000)
    assert r.ci_high - r.ci_low > boot.ci_high - boot.ci_low  # the two-stage bootstrap is too narrow at G = 4
    assert len(r.details["clusters"]["estimates"]) == 4 and r.details["noise"] == "fine-tunes + sampling"
    rec = ContrastSpec("r", "recovered_fraction", "cache_mse", candidate="fcr-fd-10", baseline="ctrl-fd-10",
                       target="fd-5")
    rr = compute_contrast(rec, df, replication=INDEPENDENT_FINETUNES)
    fr = [recovered_fraction(*(df.filter((pl.col("seed") == s) & (pl.col("variation_id") == v))["value"].mean()
                               for v in ("fcr-fd-10", "ctrl-fd-10", "fd-5"))) for s in range(4)]
    tr = mean_ci(fr)
    assert rr.ci_high - rr.ci_low >= 0.95 * (tr.high - tr.low)  # Fieller weights seeds by their gap (±2 %)
    assert rr.details["precision"]["clusters_needed"] > 4


def test_contrast_data_errors():
    df = _per_sample()
    with pytest.raises(ValueError, match="no 'cache_mse' per-sample values for variation 'fd-20'"):
        compute_contrasts([ContrastSpec("x", "difference", "cache_mse", "fd-20", "fd-5")], df,
                          replication={"x": SAME_WEIGHTS})
    dup = pl.concat([df, df.head(1)])
    with pytest.raises(ValueError, match="duplicated"):
        pair_samples(dup, df.head(1)["metric"][0], [df.head(1)["variation_id"][0]])
    inf = df.with_columns(pl.when(pl.col("variation_id") == "fd-5").then(float("inf")).otherwise(pl.col("value"))
                          .alias("value"))
    with pytest.raises(ValueError, match="non-finite"):
        compute_contrast(ContrastSpec("x", "difference", "cache_mse", "ctrl-fd-10", "fd-5"), inf,
                         replication=SAME_WEIGHTS)
    with pytest.raises(ContrastSpecError, match="n_resamples"):
        ContrastSpec("x", "difference", "cache_mse", "a", "b", n_resamples=10)


def test_computed_contrasts_round_trip_through_the_store(tmp_path):
    from fcr_eval.store import ResultsStore

    spec = ContrastSpec("recovered", "recovered_fraction", "cache_mse", candidate="fcr-fd-10", baseline="ctrl-fd-10",
                        target="fd-5", threshold=0.3, direction="at_least")
    r = compute_contrast(spec, _per_sample(), replication=SAME_WEIGHTS)
    store = ResultsStore(tmp_path / "s.duckdb")
    assert store.write_contrasts("exp", [r], code_version="test") == 1
    row = store.contrasts("exp").row(0, named=True)
    assert (row["contrast_id"], row["target"], row["verdict"], row["n_samples"]) == ("recovered", "fd-5", "PASS", 80)
    assert (row["estimate"], row["ci_low"], row["ci_high"]) == pytest.approx((r.estimate, r.ci_low, r.ci_high))
