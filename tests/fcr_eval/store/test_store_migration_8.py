"""Migration 8 (``runs.lambda_oc``) on a schema-7 store: every run keeps its values, the new column
is NULL for them (FCR or no fine-tune), and a run written afterwards stores its λ_OC."""

from __future__ import annotations

import duckdb
from fcr_eval.store import SCHEMA_VERSION, ResultsStore, RunRecord, RunResult, make_run_id
from fcr_eval.store.migrations import migrate, read_schema_version


def test_migration_8_adds_lambda_oc_and_keeps_every_run(tmp_path):
    path = tmp_path / "fcr.duckdb"
    con = duckdb.connect(str(path))
    assert migrate(con, target=7) == 7
    con.execute("INSERT INTO runs (run_id, experiment_id, variation_id, seed, status, lambda_fcr, blocks) VALUES "
                "('r1', 'exp', 'fcr-fd-10', 0, 'finished', 0.15, 'all'), "
                "('r2', 'exp', 'fd-10', 0, 'finished', NULL, NULL)")
    cols = ", ".join(r[0] for r in con.execute("DESCRIBE runs").fetchall())
    before = con.execute(f"SELECT {cols} FROM runs ORDER BY run_id").fetchall()
    assert "lambda_oc" not in cols
    con.close()

    store = ResultsStore(path)
    assert store.schema_version == SCHEMA_VERSION == 8
    con = duckdb.connect(str(path), read_only=True)
    assert read_schema_version(con) == 8
    assert con.execute(f"SELECT {cols} FROM runs ORDER BY run_id").fetchall() == before
    assert con.execute("SELECT lambda_oc FROM runs ORDER BY run_id").fetchall() == [(None,), (None,)]
    con.close()

    run = RunRecord(run_id=make_run_id("exp", "oc-fd-10", 0, {}), experiment_id="exp", variation_id="oc-fd-10",
                    seed=0, model="m", dataset="d", sampler="fd", stride=10, scheduler="ddim", resolution=8,
                    num_inference_steps=20, guidance_scale=2.0, delta_max=10, lambda_oc=0.25)
    assert store.write_run(RunResult(run))
    row = store.runs(experiment_id="exp").filter(variation_id="oc-fd-10").row(0, named=True)
    assert row["lambda_oc"] == 0.25 and row["lambda_fcr"] is None and row["delta_max"] == 10
