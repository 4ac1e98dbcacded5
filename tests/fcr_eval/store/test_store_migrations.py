"""A store written before the cache-schedule and paired-evaluation migrations (schema version 2,
rows as the runner wrote them) opens with today's code, migrates, keeps every row and gains the
effective cache schedule where it can be told."""

from __future__ import annotations

import json
from dataclasses import asdict

import duckdb
import pytest
from fcr_eval.spec.experiment import VariationSpec
from fcr_eval.store import SCHEMA_VERSION, ResultsStore, StoreSchemaError, make_run_id
from fcr_eval.store.migrations import migrate

V2 = 2  # the schema version stores were written at before migrations 3 and 4

# variation → (VariationSpec, steps, expected cache_label, key steps, interval)
OLD_RUNS = {
    "fd-5": (VariationSpec("fd-5", "embedded", "fd", stride=5), 20, "FD-5", [0, 5, 10, 15], 5),
    "fd-10-seq": (VariationSpec("fd-10-seq", "embedded", "fd", stride=10, parallel_decoding=False), 20,
                  "FD-10-seq", [0, 10], 10),
    # the published schedule ignores the stride: the stride column alone would say "FD-10"
    "fd-published": (VariationSpec("fd-published", "embedded", "fd", stride=10, schedule="faster-diffusion"),
                     20, "FD-published", [0, 1, 2, 3, 5, 10, 15], None),
    "deepcache-3": (VariationSpec("deepcache-3", "embedded", "deepcache", stride=3, cache_branch_id=1), 10,
                    "DeepCache-N3-b1", [0, 3, 6, 9], 3),
    "none": (VariationSpec("none", "embedded", "none"), 20, "none", None, None),
    # a published schedule at a step count it does not exist for: not derivable, stays NULL
    "fd-published-30": (VariationSpec("fd-published-30", "embedded", "fd", schedule="faster-diffusion"), 30,
                        None, None, None),
}

V2_RUN_COLUMNS = ("run_id, experiment_id, variation_id, seed, status, model, dataset, sampler, stride, "
                  "parallel_decoding, lambda_fcr, delta_max, blocks, scheduler, resolution, "
                  "num_inference_steps, guidance_scale, params, config, code_version, device, started_at, "
                  "finished_at, run_dir")


def write_v2_store(path) -> dict[str, str]:
    """A schema-2 store with the rows the runner wrote before this change; returns run ids."""
    con = duckdb.connect(str(path))
    assert migrate(con, target=V2) == V2
    ids = {}
    for seed in (0, 1):
        for vid, (v, steps, *_expected) in OLD_RUNS.items():
            config = {"experiment_id": "old-exp", "variation": asdict(v), "seed": seed,
                      "sampling": {"scheduler": "ddim", "steps": steps, "guidance_scale": 2.0,
                                   "resolution": 28, "n_samples": 4}}
            run_id = make_run_id("old-exp", vid, seed, config)
            ids[f"{vid}/s{seed}"] = run_id
            con.execute(
                f"INSERT INTO runs ({V2_RUN_COLUMNS}) VALUES (?, 'old-exp', ?, ?, 'finished', 'embedded', "
                "'fashion-mnist', ?, ?, ?, NULL, NULL, NULL, 'ddim', 28, ?, 2.0, ?, ?, 'v0.1', 'cpu: 2 cores', "
                "TIMESTAMP '2026-11-01 10:00:00', TIMESTAMP '2026-11-01 10:05:00', ?)",
                [run_id, vid, seed, v.sampler, v.stride, v.parallel_decoding if v.sampler == "fd" else None,
                 steps, json.dumps({"model_family": "embedded"}), json.dumps(config), f"runs/old-exp/{vid}/s{seed}"])
            con.execute("INSERT INTO metrics VALUES (?, 'fd_efficientnet_lite0', ?, 'efficientnet_lite0', "
                        "'bilinear_224', 4, '{}')", [run_id, 10.0 + seed])
            con.execute("INSERT INTO timings VALUES (?, 1, 0.05, ?, 3, ?, 1e9, 1234, 'process_rss', 'cpu', 4, 1)",
                        [run_id, steps, steps])
            con.execute("INSERT INTO samples VALUES (?, 'p0', 'a photo of a bag', ?, 'samples/x.png', 'bag', 28, 28)",
                        [run_id, seed])
    con.execute("INSERT INTO criteria VALUES ('old-exp', 'speedup', true, 1.5, 1.4, '{}', now(), 'v0.1'), "
                "('old-exp', 'quality_delta', false, 0.2, 0.05, '{}', now(), 'v0.1'), "
                "('old-exp', 'finetune_compute', NULL, NULL, 0.03, '{}', now(), 'v0.1')")
    con.close()
    return ids


def _dump(path, table: str, columns: str = "*") -> list[tuple]:
    con = duckdb.connect(str(path), read_only=True)
    try:
        return con.execute(f"SELECT {columns} FROM {table} ORDER BY ALL").fetchall()
    finally:
        con.close()


def test_a_version_2_store_migrates_keeping_every_row(tmp_path):
    path = tmp_path / "old.duckdb"
    write_v2_store(path)
    before = {t: _dump(path, t) for t in ("metrics", "timings", "samples")}
    runs_before = _dump(path, "runs", V2_RUN_COLUMNS)
    with pytest.raises(StoreSchemaError, match="migrate it once with `fcr-eval migrate --store "):
        ResultsStore.open_readonly(path)  # readers never migrate

    store = ResultsStore(path)  # the writer migrates
    assert store.schema_version == SCHEMA_VERSION
    assert store.sql("SELECT version FROM schema_version ORDER BY 1")["version"].to_list() == \
        list(range(1, SCHEMA_VERSION + 1))
    assert _dump(path, "runs", V2_RUN_COLUMNS) == runs_before
    assert {t: _dump(path, t) for t in before} == before
    assert len(store.finished_run_ids("old-exp")) == 2 * len(OLD_RUNS)
    # the new tables exist and are empty
    for table in ("sample_metrics", "sample_metric_definitions", "contrasts"):
        assert store.sql(f"SELECT count(*) AS n FROM {table}")["n"][0] == 0
    ResultsStore.open_readonly(path)  # and now a reader opens it


def test_migration_back_fills_the_effective_cache_schedule(tmp_path):
    path = tmp_path / "old.duckdb"
    ids = write_v2_store(path)
    store = ResultsStore(path)
    runs = {r["run_id"]: r for r in store.runs("old-exp").iter_rows(named=True)}
    for vid, (_v, _steps, label, keys, interval) in OLD_RUNS.items():
        for seed in (0, 1):
            row = runs[ids[f"{vid}/s{seed}"]]
            assert (row["cache_label"], row["cache_key_steps"], row["cache_interval"]) == (label, keys, interval), vid
    assert store.runs("old-exp").schema["cache_key_steps"].inner is not None  # a typed list column


def test_migration_gives_old_criteria_their_verdict(tmp_path):
    path = tmp_path / "old.duckdb"
    write_v2_store(path)
    crit = ResultsStore(path).criteria("old-exp")
    verdicts = dict(zip(crit["criterion"].to_list(), crit["verdict"].to_list(), strict=True))
    assert verdicts == {"speedup": "PASS", "quality_delta": "FAIL", "finetune_compute": None}
    assert crit["ci_low"].null_count() == crit.height


def test_new_rows_carry_the_schedule_they_are_given(tmp_path):
    from fcr_eval.plan.samplers import resolve_sampler
    from fcr_eval.store import RunRecord, RunResult

    store = ResultsStore(tmp_path / "s.duckdb")
    sampler = resolve_sampler("fd", steps=20, schedule="faster-diffusion")
    run = RunRecord(run_id="e/v/s0/x", experiment_id="e", variation_id="v", seed=0, model="m", dataset="d",
                    sampler="fd", scheduler="ddim", resolution=28, num_inference_steps=20, guidance_scale=2.0,
                    **sampler.describe())
    store.write_run(RunResult(run))
    row = store.runs("e").row(0, named=True)
    assert (row["cache_label"], row["cache_key_steps"], row["cache_interval"]) == \
        ("FD-published", [0, 1, 2, 3, 5, 10, 15], None)
    # callers that do not know the schedule yet still write (columns stay NULL)
    store.write_run(RunResult(RunRecord(run_id="e/w/s0/y", experiment_id="e", variation_id="w", seed=0, model="m",
                                        dataset="d", sampler="fd", stride=5, scheduler="ddim", resolution=28,
                                        num_inference_steps=20, guidance_scale=2.0)))
    assert store.runs("e", "w")["cache_label"].to_list() == [None]
