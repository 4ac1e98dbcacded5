"""Migration 7 (``cache_attribution``) on a schema-6 store: every row stays, the table is added
empty and takes a run's attribution rows; a run's attribution goes with the run when it is replaced."""

from __future__ import annotations

import duckdb
from fcr_eval.store import (
    SCHEMA_VERSION,
    AttributionValue,
    ResultsStore,
    RunRecord,
    RunResult,
    make_run_id,
)
from fcr_eval.store.migrations import migrate, read_schema_version


def _run(variation: str) -> RunRecord:
    return RunRecord(run_id=make_run_id("exp", variation, 0, {}), experiment_id="exp", variation_id=variation,
                     seed=0, model="m", dataset="d", sampler="fd", stride=2, scheduler="ddim", resolution=8,
                     num_inference_steps=4, guidance_scale=2.0)


def test_migration_7_keeps_every_row_of_a_schema_6_store_and_adds_the_table(tmp_path):
    path = tmp_path / "fcr.duckdb"
    con = duckdb.connect(str(path))
    assert migrate(con, target=6) == 6
    con.execute("INSERT INTO runs (run_id, experiment_id, variation_id, seed, status) VALUES "
                "('r1', 'exp', 'fd-2', 0, 'finished'), ('r2', 'exp', 'none', 0, 'finished')")
    con.execute("INSERT INTO metrics (run_id, metric, value, n_samples) VALUES ('r1', 'kid', 0.5, 4), "
                "('r2', 'kid', 0.25, 4)")
    con.execute("INSERT INTO feature_stats (run_id, block, delta, variance, n) VALUES ('r1', 'all', 1, 0.1, 3)")
    columns = {t: ", ".join(r[0] for r in con.execute(f"DESCRIBE {t}").fetchall())
               for t in ("runs", "metrics", "feature_stats")}  # later migrations add columns
    before = {t: con.execute(f"SELECT {c} FROM {t} ORDER BY ALL").fetchall() for t, c in columns.items()}
    assert "cache_attribution" not in {r[0] for r in con.execute("SHOW TABLES").fetchall()}
    con.close()

    store = ResultsStore(path)
    assert store.schema_version == SCHEMA_VERSION
    con = duckdb.connect(str(path), read_only=True)
    assert read_schema_version(con) == SCHEMA_VERSION
    for table, rows in before.items():
        assert con.execute(f"SELECT {columns[table]} FROM {table} ORDER BY ALL").fetchall() == rows, table
    cols = [r[0] for r in con.execute("DESCRIBE cache_attribution").fetchall()]
    assert cols == ["run_id", "step", "timestep", "feature", "quantity", "value", "n_samples"]
    assert con.execute("SELECT count(*) FROM cache_attribution").fetchone()[0] == 0
    con.close()
    assert store.cache_attribution().height == 0


def test_a_run_writes_and_reads_its_attribution(tmp_path):
    store = ResultsStore(tmp_path / "fcr.duckdb")
    rows = [AttributionValue(1, 950.0, "all", "eps_error", 0.3, 4),
            AttributionValue(1, 950.0, "mid_block", "only_stale_error", 0.01, 4),
            AttributionValue(3, 850.0, "all", "eps_error", 0.2, 4)]
    assert store.write_run(RunResult(_run("fd-2"), cache_attribution=rows))
    got = store.cache_attribution("exp", "fd-2", quantity="eps_error")
    assert got["step"].to_list() == [1, 3] and got["value"].to_list() == [0.3, 0.2]
    assert set(got["n_samples"].to_list()) == {4} and got["seed"].to_list() == [0, 0]
    assert store.cache_attribution("exp", "fd-2", feature="mid_block")["value"].to_list() == [0.01]
    assert store.cache_attribution("exp", "other").height == 0
