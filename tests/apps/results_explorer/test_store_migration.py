"""A store written at schema version 2 (before the cache-schedule and paired-evaluation
migrations), with rows as the runner wrote them, still shows in the explorer once a writer has
migrated it: the queries the views call load it with every number intact."""

from __future__ import annotations

import json

import duckdb
import pytest
from fcr_eval.store import SCHEMA_VERSION, ResultsStore
from fcr_eval.store.migrations import migrate
from fcr_results_explorer import queries as q
from fcr_results_explorer.reader import StoreLocation, StoreReader

FD = "fd_efficientnet_lite0"
# variation: (sampler, stride, schedule, FD per seed)
OLD = {"fd-5": ("fd", 5, "uniform", [10.0, 12.0]), "fd-10": ("fd", 10, "uniform", [20.0, 22.0]),
       "fd-published": ("fd", 10, "faster-diffusion", [15.0, 17.0]), "none": ("none", None, "uniform", [9.0, 9.5])}


def _v2_store(path):
    con = duckdb.connect(str(path))
    migrate(con, target=2)
    for vid, (sampler, stride, schedule, fds) in OLD.items():
        for seed, fd in enumerate(fds):
            run_id = f"old/{vid}/s{seed}/0"
            config = {"variation": {"id": vid, "sampler": sampler, "stride": stride, "schedule": schedule,
                                    "parallel_decoding": True, "cache_branch_id": 0}, "seed": seed}
            con.execute(
                "INSERT INTO runs VALUES (?, 'old', ?, ?, 'finished', 'embedded', 'fashion-mnist', ?, ?, ?, "
                "NULL, NULL, NULL, 'ddim', 28, 20, 2.0, '{}', ?, 'v0.1', 'cpu: 2 cores', "
                "TIMESTAMP '2026-11-01 10:00:00', TIMESTAMP '2026-11-01 10:05:00', NULL)",
                [run_id, vid, seed, sampler, stride, True if sampler == "fd" else None, json.dumps(config)])
            con.execute(f"INSERT INTO metrics VALUES (?, '{FD}', ?, 'efficientnet_lite0', 'bilinear_224', 8, '{{}}')",
                        [run_id, fd])
            con.execute("INSERT INTO timings VALUES (?, 1, 0.05, 20, 4, 20, 1e9, 1234, 'process_rss', 'cpu', 4, 1)",
                        [run_id])
            con.execute("INSERT INTO feature_stats VALUES (?, 'all', 1, 0.5, 16), (?, 'all', 2, 0.7, 16)",
                        [run_id, run_id])
            con.execute("INSERT INTO samples VALUES (?, 'p0', 'a photo of a bag', ?, 'samples/x.png', 'bag', 28, 28)",
                        [run_id, seed])
    con.execute("INSERT INTO criteria VALUES ('old', 'speedup', true, 1.5, 1.4, '{}', "
                "TIMESTAMP '2026-11-01 11:00:00', 'v0.1')")
    con.close()
    return path


@pytest.fixture
def migrated(tmp_path):
    path = _v2_store(tmp_path / "fcr.duckdb")
    assert ResultsStore(path).schema_version == SCHEMA_VERSION  # a writer opened it once
    return path


def test_the_explorer_loads_a_migrated_version_2_store(migrated):
    flt = q.RunFilter()
    with StoreReader(StoreLocation.resolve(migrated)) as reader:
        assert q.count_runs(reader, flt) == 8
        overview = q.experiments_overview(reader, flt)
        assert overview["runs"].to_list() == [8] and overview["variations"].to_list() == [4]
        assert q.metric_catalogue(reader)[:1] and FD in q.metric_catalogue(reader)
        by_var = q.metric_by_variation(reader, flt, FD)
        means = dict(zip(by_var["variation"].to_list(), by_var["mean"].to_list(), strict=True))
        assert means == {"fd-5": 11.0, "fd-10": 21.0, "fd-published": 16.0, "none": 9.25}
        var = q.variance_by_delta(reader, flt, "all")
        assert var.height == 8 and sorted(set(var["mean"].to_list())) == [0.5, 0.7]
        assert q.latest_criteria(reader, ("old",))["passed"].to_list() == [True]
        assert q.samples_for(reader, flt, "p0", 1, ["fd-5", "none"]).height == 2
        assert q.variations_overview(reader, flt).height == 4
        labels = reader.frame("SELECT variation_id, any_value(cache_label) AS l FROM runs GROUP BY 1 ORDER BY 1")
        assert labels.rows() == [("fd-10", "FD-10"), ("fd-5", "FD-5"), ("fd-published", "FD-published"),
                                 ("none", "none")]


def test_the_explorer_app_renders_a_migrated_version_2_store(migrated, app_for):
    at = app_for(migrated)
    at.run()
    assert not at.exception
    assert {m.label: m.value for m in at.metric}["Runs"] == "8"
