"""The results store: one-transaction writes, skip-if-finished, migrations, read-only access."""

from __future__ import annotations

import dataclasses
import json

import duckdb
import pytest
from fcr_eval.store import (
    SCHEMA_VERSION,
    CriterionResult,
    FeatureStat,
    MetricRecord,
    PerPromptScore,
    ResultsStore,
    RunRecord,
    RunResult,
    SampleRecord,
    StoreError,
    StoreLockedError,
    StoreSchemaError,
    TimingRecord,
    apply_migrations,
    make_run_id,
    migrate,
    read_schema_version,
)
from fcr_eval.store import migrations as migrations_mod

CONTRACT_COLUMNS = {
    "runs": ["run_id", "experiment_id", "variation_id", "seed", "status", "model", "dataset",
             "sampler", "stride", "parallel_decoding", "lambda_fcr", "delta_max", "blocks",
             "scheduler", "resolution", "num_inference_steps", "guidance_scale", "params", "config",
             "code_version", "device", "started_at", "finished_at"],
    "metrics": ["run_id", "metric", "value", "feature_extractor", "preprocessing", "n_samples", "details"],
    "per_prompt_scores": ["run_id", "metric", "prompt_id", "value"],
    "timings": ["run_id", "batch_size", "sec_per_image", "unet_calls", "encoder_forwards",
                "decoder_forwards", "flops_per_image", "peak_memory_bytes", "memory_kind", "device"],
    "feature_stats": ["run_id", "block", "delta", "variance", "n"],
    "samples": ["run_id", "prompt_id", "prompt", "seed", "image_path", "class_label", "width", "height"],
    "criteria": ["experiment_id", "criterion", "passed", "value", "threshold", "details",
                 "evaluated_at", "code_version"],
    "human_study_results": ["study_id", "variation_a", "variation_b", "n_a", "n_b", "n_tie",
                            "n_both_bad", "win_rate_a", "ci_low", "ci_high", "p_value", "analysed_at"],
    "human_study_scores": ["study_id", "variation", "bt_score", "ci_low", "ci_high"],
    "schema_version": ["version", "applied_at"],
}


def _result(variation="fd-10", seed=0, n_prompts=5) -> RunResult:
    cfg = {"stride": 10, "variation": variation}
    run = RunRecord(
        run_id=make_run_id("exp-t", variation, seed, cfg), experiment_id="exp-t",
        variation_id=variation, seed=seed, model="embedded", dataset="fashion-mnist", sampler="fd",
        stride=10, parallel_decoding=True, scheduler="ddim", resolution=32, num_inference_steps=20,
        guidance_scale=2.0, params={"protocol": "none"}, config=cfg, code_version="test",
        device="cpu: 2 cores",
    )
    return RunResult(
        run,
        metrics=[MetricRecord("fd_efficientnet_lite0", 12.5, "efficientnet_lite0", "bilinear_224", 100,
                              {"reference": "fashion-mnist-test"})],
        per_prompt_scores=[PerPromptScore("class_agreement", f"p{i}", i / n_prompts) for i in range(n_prompts)],
        timings=[TimingRecord(1, 0.05, 20, 3, 20, 1e9, 123456, "process_rss", n_images=8, warmup=2)],
        feature_stats=[FeatureStat("all", d, 0.1 * d, 16) for d in range(1, 4)],
        samples=[SampleRecord(f"p{i}", "a photo of a shirt", seed, f"samples/{i}.png", 32, 32, "shirt")
                 for i in range(n_prompts)],
    )


def _counts(path) -> dict[str, int]:
    con = duckdb.connect(str(path), read_only=True)
    try:
        return {t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                for t in ("runs", "metrics", "per_prompt_scores", "timings", "feature_stats", "samples")}
    finally:
        con.close()


def test_schema_has_every_contract_column(tmp_path):
    ResultsStore(tmp_path / "s.duckdb")
    con = duckdb.connect(str(tmp_path / "s.duckdb"), read_only=True)
    for table, cols in CONTRACT_COLUMNS.items():
        have = [r[0] for r in con.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = ? ORDER BY ordinal_position",
            [table]).fetchall()]
        assert have[: len(cols)] == cols, table  # contract columns first, in order; additions after
    assert con.execute("SELECT max(version) FROM schema_version").fetchone()[0] == SCHEMA_VERSION


def test_write_run_roundtrip_and_skip_if_finished(tmp_path):
    s = ResultsStore(tmp_path / "s.duckdb")
    res = _result()
    assert not s.is_finished(res.run.run_id)
    assert s.write_run(res) is True
    assert s.is_finished(res.run.run_id)
    assert s.write_run(res) is False  # finished run: skipped, no duplicate rows
    assert _counts(tmp_path / "s.duckdb") == {"runs": 1, "metrics": 1, "per_prompt_scores": 5,
                                              "timings": 1, "feature_stats": 3, "samples": 5}
    r = ResultsStore.open_readonly(tmp_path / "s.duckdb")
    m = r.metrics(experiment_id="exp-t")
    assert m["value"].to_list() == [12.5] and m["variation_id"].to_list() == ["fd-10"]
    assert json.loads(m["details"][0]) == {"reference": "fashion-mnist-test"}
    assert r.feature_stats(run_id=res.run.run_id)["delta"].to_list() == [1, 2, 3]
    assert r.runs()["finished_at"].null_count() == 0
    assert r.finished_run_ids("exp-t") == {res.run.run_id}


def test_failure_mid_write_leaves_nothing(tmp_path, monkeypatch):
    s = ResultsStore(tmp_path / "s.duckdb")
    real_insert = ResultsStore._insert

    def failing_insert(con, table, ncols, rows):
        if table == "samples":
            raise RuntimeError("disk full (simulated)")
        return real_insert(con, table, ncols, rows)

    monkeypatch.setattr(ResultsStore, "_insert", staticmethod(failing_insert))
    res = _result()
    with pytest.raises(RuntimeError, match="simulated"):
        s.write_run(res)
    assert _counts(tmp_path / "s.duckdb") == dict.fromkeys(
        ["runs", "metrics", "per_prompt_scores", "timings", "feature_stats", "samples"], 0)
    assert not s.is_finished(res.run.run_id)
    monkeypatch.setattr(ResultsStore, "_insert", staticmethod(real_insert))
    assert s.write_run(res) is True  # the retry writes the whole run


def test_bad_value_mid_write_leaves_nothing(tmp_path):
    s = ResultsStore(tmp_path / "s.duckdb")
    res = _result()
    res.samples.append(SampleRecord("px", "x", 0, "/elsewhere/x.png", 32, 32))  # outside the store
    with pytest.raises(StoreError, match="outside the store"):
        s.write_run(res)
    assert _counts(tmp_path / "s.duckdb")["runs"] == 0


def test_migration_from_version_1_keeps_data(tmp_path):
    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    assert migrate(con, target=1) == 1
    con.execute("INSERT INTO runs (run_id, experiment_id, variation_id, seed, status) "
                "VALUES ('old-run', 'e', 'v', 0, 'finished')")
    con.execute("INSERT INTO timings (run_id, batch_size, sec_per_image) VALUES ('old-run', 1, 0.5)")
    con.close()
    with pytest.raises(StoreSchemaError, match="migrate it once with `fcr-eval migrate --store "):
        ResultsStore.open_readonly(path)
    s = ResultsStore(path)  # the writer migrates
    assert s.schema_version == SCHEMA_VERSION
    assert s.is_finished("old-run")
    t = s.timings(run_id="old-run")
    assert t["sec_per_image"].to_list() == [0.5] and t["n_images"].to_list() == [None]
    versions = s.sql("SELECT version FROM schema_version ORDER BY version")["version"].to_list()
    assert versions == list(range(1, SCHEMA_VERSION + 1))


def test_the_migrate_command_readers_name_migrates(tmp_path, capsys):
    """The command a reader's hint names brings an old store to this schema; a second call has
    nothing to do; a file that is not a results store is refused and left as it was."""
    from fcr_eval.cli import main

    path = tmp_path / "old.duckdb"
    with duckdb.connect(str(path)) as con:
        migrate(con, target=1)
    assert main(["migrate", "--store", str(path)]) == 0
    assert f"schema version 1 -> {SCHEMA_VERSION}" in capsys.readouterr().out
    assert ResultsStore.open_readonly(path).schema_version == SCHEMA_VERSION
    assert main(["migrate", "--store", str(path)]) == 0
    assert "nothing to do" in capsys.readouterr().out
    other = tmp_path / "other.duckdb"
    with duckdb.connect(str(other)) as con:
        con.execute("CREATE TABLE customers (id INTEGER)")
    before = other.read_bytes()
    assert main(["migrate", "--store", str(other)]) == 2
    assert "is not a results store: it is a DuckDB database with other tables (customers)" in capsys.readouterr().err
    assert other.read_bytes() == before


def test_failed_migration_rolls_back(tmp_path, monkeypatch):
    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    migrate(con, target=1)
    con.close()

    def broken(con):
        con.execute("ALTER TABLE runs ADD COLUMN run_dir VARCHAR")
        raise RuntimeError("migration bug (simulated)")

    monkeypatch.setattr(migrations_mod, "MIGRATIONS", (migrations_mod.MIGRATIONS[0], broken))
    with pytest.raises(RuntimeError, match="simulated"):
        ResultsStore(path)
    con = duckdb.connect(str(path), read_only=True)
    assert con.execute("SELECT max(version) FROM schema_version").fetchone()[0] == 1
    cols = [r[0] for r in con.execute("SELECT column_name FROM information_schema.columns "
                                      "WHERE table_name = 'runs'").fetchall()]
    assert "run_dir" not in cols


def test_newer_store_is_refused(tmp_path):
    path = tmp_path / "new.duckdb"
    ResultsStore(path)
    con = duckdb.connect(str(path))
    con.execute("INSERT INTO schema_version VALUES (?, now())", [SCHEMA_VERSION + 1])
    con.close()
    with pytest.raises(StoreSchemaError, match="upgrade fcr-eval"):
        ResultsStore(path)


def test_readonly_refuses_writes_and_missing_file(tmp_path):
    with pytest.raises(StoreError, match="no results store"):
        ResultsStore.open_readonly(tmp_path / "missing.duckdb")
    ResultsStore(tmp_path / "s.duckdb")
    r = ResultsStore.open_readonly(tmp_path / "s.duckdb")
    with pytest.raises(StoreError, match="read-only"):
        r.write_run(_result())


def test_locked_store_names_the_holder(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "s.duckdb"
    ResultsStore(path)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         f"import duckdb, sys, time; c = duckdb.connect({str(path)!r}); print('ok', flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ok"
        s = ResultsStore.__new__(ResultsStore)
        s.path, s.read_only, s.lock_timeout = path, False, 0.3
        with pytest.raises(StoreLockedError, match=rf"PID {holder.pid}"):
            s.is_finished("x")
    finally:
        holder.kill()
        holder.wait()


def test_criteria_replace_and_summary(tmp_path):
    s = ResultsStore(tmp_path / "s.duckdb")
    for seed, v in enumerate([10.0, 12.0, 14.0]):
        res = _result(seed=seed)
        res.metrics[0] = MetricRecord("fd_efficientnet_lite0", v, "efficientnet_lite0", "bilinear_224", 100)
        s.write_run(res)
    from fcr_eval.analysis.stats import seed_summary

    summ = seed_summary(s.metrics(experiment_id="exp-t", metric="fd_efficientnet_lite0"))
    assert summ["n_seeds"].to_list() == [3] and summ["mean"].to_list() == [12.0]
    assert summ["ci_low"][0] < 12.0 < summ["ci_high"][0]
    c = CriterionResult("exp-t", "speedup", True, 1.5, 1.4, {"a": 1})
    s.write_criteria([c])
    s.write_criteria([CriterionResult("exp-t", "speedup", False, 1.2, 1.4)])
    crit = s.criteria("exp-t")
    assert crit.height == 1 and crit["passed"].to_list() == [False]


def test_run_id_is_stable_and_config_sensitive():
    a = make_run_id("e", "v", 0, {"x": 1, "y": 2})
    assert a == make_run_id("e", "v", 0, {"y": 2, "x": 1})
    assert a != make_run_id("e", "v", 0, {"x": 1, "y": 3})
    assert a != make_run_id("e", "v", 1, {"x": 1, "y": 2})


def test_large_run_writes(tmp_path):
    s = ResultsStore(tmp_path / "s.duckdb")
    assert s.write_run(_result(n_prompts=3000))
    assert _counts(tmp_path / "s.duckdb")["per_prompt_scores"] == 3000


def test_a_large_run_round_trips_every_value_exactly(tmp_path):
    """The bulk insert reads column by column and DuckDB infers an object column's type from a
    sample of its rows: values past that sample (floats after 2,000 whole numbers, text after 2,500
    missing labels), exact float bits, infinities, NaN (stored as NULL) and a list must all come back
    as written."""
    n = 3000
    res = _result(n_prompts=n)
    values = [float(i) for i in range(2000)] + [0.1 * i + 1 / 3 for i in range(1000)]
    values[5], values[6], values[2500] = float("inf"), float("nan"), -float("inf")
    res.per_prompt_scores[:] = [PerPromptScore("class_agreement", f"p{i}", v) for i, v in enumerate(values)]
    res.samples[:] = [SampleRecord(f"p{i}", f"prompt {i}", 0, f"samples/{i}.png", 32, 32,
                                   None if i < 2500 else f"label {i}") for i in range(n)]
    res = dataclasses.replace(res, run=dataclasses.replace(res.run, cache_key_steps=(0, 3, 9)))
    s = ResultsStore(tmp_path / "s.duckdb")
    assert s.write_run(res)
    con = duckdb.connect(str(tmp_path / "s.duckdb"), read_only=True)
    try:
        got = dict(con.execute("SELECT prompt_id, value FROM per_prompt_scores").fetchall())
        labels = dict(con.execute("SELECT prompt_id, class_label FROM samples").fetchall())
        steps = con.execute("SELECT cache_key_steps FROM runs").fetchone()[0]
    finally:
        con.close()
    assert got.pop("p6") is None  # NaN is stored as NULL
    assert all(got[f"p{i}"] == v for i, v in enumerate(values) if i != 6)  # bit for bit, inf included
    assert [labels[f"p{i}"] for i in (0, 2499, 2500, 2999)] == [None, None, "label 2500", "label 2999"]
    assert steps == [0, 3, 9]


def test_empty_and_null_results_are_typed(tmp_path):
    import polars as pl

    s = ResultsStore(tmp_path / "s.duckdb")
    empty = s.metrics(experiment_id="nothing")
    assert empty.height == 0 and empty.schema["value"] == pl.Float64 and empty.schema["metric"] == pl.String
    assert empty.filter(pl.col("metric") == "x").height == 0
    s.write_run(_result())
    runs = s.runs()
    assert runs.schema["lambda_fcr"] == pl.Float64 and runs["lambda_fcr"].to_list() == [None]
    assert runs.schema["finished_at"] == pl.Datetime("us")


def _tables(con):
    return sorted(r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall())


def test_apply_migrations_applies_in_order_and_skips_applied_ones(tmp_path):
    order = []

    def add_column(con):
        order.append(2)
        con.execute("ALTER TABLE votes ADD COLUMN rater VARCHAR")

    migrations = [(1, "CREATE TABLE votes (choice VARCHAR); INSERT INTO votes VALUES ('a')"), (2, add_column),
                  (3, lambda con: order.append(3) or con.execute("CREATE TABLE notes (t VARCHAR)"))]
    path = tmp_path / "m.duckdb"
    con = duckdb.connect(str(path))
    assert apply_migrations(con, migrations, table="study_version", target=2) == 2
    assert order == [2] and _tables(con) == ["study_version", "votes"]
    assert apply_migrations(con, migrations, table="study_version") == 3  # only 3 is new
    assert apply_migrations(con, migrations, table="study_version") == 3  # nothing to do
    assert order == [2, 3]
    rows = con.execute("SELECT version, applied_at FROM study_version ORDER BY version").fetchall()
    assert [r[0] for r in rows] == [1, 2, 3] and all(r[1] is not None for r in rows)
    assert con.execute("SELECT * FROM votes").fetchall() == [("a", None)]
    assert read_schema_version(con, table="study_version") == 3 and read_schema_version(con) == 0
    con.close()


def test_apply_migrations_rolls_back_a_failing_one(tmp_path):
    def broken(con):
        con.execute("ALTER TABLE votes ADD COLUMN rater VARCHAR")
        con.execute("INSERT INTO votes VALUES ('b', 'r1')")
        raise RuntimeError("migration bug (simulated)")

    con = duckdb.connect(str(tmp_path / "m.duckdb"))
    good = [(1, "CREATE TABLE votes (choice VARCHAR); INSERT INTO votes VALUES ('a')")]
    with pytest.raises(RuntimeError, match="simulated"):
        apply_migrations(con, good + [(2, broken), (3, "CREATE TABLE notes (t VARCHAR)")])
    # version 1 committed on its own; 2 left nothing behind, 3 never ran
    assert read_schema_version(con) == 1 and _tables(con) == ["schema_version", "votes"]
    assert con.execute("SELECT * FROM votes").fetchall() == [("a",)]
    with pytest.raises(duckdb.Error):
        apply_migrations(con, good + [(2, "CREATE TABLE notes (t VARCHAR); SELECT * FROM no_such_table")])
    assert read_schema_version(con) == 1 and "notes" not in _tables(con)
    assert apply_migrations(con, good + [(2, "ALTER TABLE votes ADD COLUMN rater VARCHAR")]) == 2  # fixed code


def test_apply_migrations_refuses_newer_database_and_bad_lists():
    con = duckdb.connect(":memory:")
    apply_migrations(con, [(1, "CREATE TABLE a (x INTEGER)"), (2, "CREATE TABLE b (x INTEGER)")])
    with pytest.raises(StoreSchemaError, match="schema version 2"):
        apply_migrations(con, [(1, "CREATE TABLE a (x INTEGER)")])

    class TooNew(Exception):
        pass

    with pytest.raises(TooNew, match="2 > 1"):
        apply_migrations(con, [(1, "")], newer_error=lambda db, known: TooNew(f"{db} > {known}"))
    with pytest.raises(StoreSchemaError, match="no migration to version 5"):
        apply_migrations(con, [(1, ""), (2, "")], target=5)
    with pytest.raises(ValueError, match="strictly increasing"):
        apply_migrations(con, [(2, ""), (1, "")])
    with pytest.raises(ValueError, match="identifier"):
        apply_migrations(con, [(1, "")], table="v; DROP TABLE a")
    assert read_schema_version(con) == 2 and _tables(con) == ["a", "b", "schema_version"]
