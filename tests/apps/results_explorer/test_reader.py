"""Read-only access while another process writes, the CLI, and the small helpers."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import polars as pl
import pytest
from fcr_eval.store import ResultsStore
from fcr_results_explorer import cli
from fcr_results_explorer.app_env import ENV_DB, ENV_HUMAN_STUDY
from fcr_results_explorer.reader import StoreLocation, StoreReader
from fcr_results_explorer.stats import format_mean_ci, pareto_front, t_half_width
from fcr_results_explorer.ui import csv_bytes

HOLD = textwrap.dedent(
    """
    import sys, time, duckdb
    con = duckdb.connect(sys.argv[1])          # read-write: takes DuckDB's file lock
    con.execute("CREATE TABLE IF NOT EXISTS writer_was_here (i INTEGER)")
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
    con.close()
    """
)


def _hold_lock(db: Path, seconds: float) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(db), str(seconds)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def _copy(small_store: Path, tmp_path: Path) -> Path:
    db = tmp_path / "fcr.duckdb"
    shutil.copy(small_store, db)
    return db


def test_reader_opens_read_only_and_closes(small_store, tmp_path):
    db = _copy(small_store, tmp_path)
    with StoreReader(StoreLocation.resolve(db)) as reader:
        assert reader.frame("SELECT count(*) AS n FROM runs")["n"][0] == 11
        assert not reader.note.is_snapshot
        with pytest.raises(Exception, match="read-only"):
            reader.con.execute("DELETE FROM runs")
    # closed: a writer can open the file straight away
    assert ResultsStore(db, lock_timeout=0.5).finished_run_ids("exp-b")


def test_a_running_writer_is_read_through_a_snapshot(small_store, tmp_path):
    db = _copy(small_store, tmp_path)
    holder = _hold_lock(db, 30)
    try:
        reader = StoreReader(StoreLocation.resolve(db), retries=2, backoff_s=0.05)
        assert reader.frame("SELECT count(*) AS n FROM runs")["n"][0] == 11
        assert reader.note.is_snapshot
        assert reader.note.lock_holder_pid == str(holder.pid)
        # the writer's uncommitted-to-file work (in its WAL) is visible too
        assert reader.has("writer_was_here")
        reader.close()
    finally:
        holder.kill()
        holder.wait()


def test_a_snapshot_torn_by_the_writer_is_taken_again(small_store, tmp_path, monkeypatch):
    """A copy taken while the writer grows the file can end before its tables' data (it still
    opens: the catalog is at the front). That is a torn snapshot, not a cut-off store: the reader
    copies again rather than calling the user's store cut off (seen under load, the live-writer test)."""
    import fcr_results_explorer.reader as reader_module

    db = _copy(small_store, tmp_path)
    real_copy, copies = shutil.copyfile, []

    def copy_torn_once(src, dst, *args, **kwargs):
        out = real_copy(src, dst, *args, **kwargs)
        copies.append(Path(dst).name)
        if len(copies) == 1:  # the first copy of the store file is cut as a racing writer would leave it
            with open(dst, "r+b") as f:
                f.truncate(Path(src).stat().st_size // 2)
        return out

    monkeypatch.setattr(reader_module.shutil, "copyfile", copy_torn_once)
    holder = _hold_lock(db, 30)
    try:
        reader = StoreReader(StoreLocation.resolve(db), retries=1, backoff_s=0.01)
        assert reader.frame("SELECT count(*) AS n FROM runs")["n"][0] == 11
        assert reader.note.is_snapshot
        reader.close()
    finally:
        holder.kill()
        holder.wait()
    assert copies[0] == "fcr-0.duckdb" and "fcr-1.duckdb" in copies, copies  # the torn copy was taken again


def test_a_short_write_is_waited_for_not_snapshotted(small_store, tmp_path):
    db = _copy(small_store, tmp_path)
    holder = _hold_lock(db, 0.4)
    try:
        reader = StoreReader(StoreLocation.resolve(db), retries=6, backoff_s=0.1)
        assert reader.frame("SELECT count(*) AS n FROM runs")["n"][0] == 11
        assert not reader.note.is_snapshot
        reader.close()
    finally:
        holder.wait()


def test_the_app_says_it_shows_a_snapshot(small_store, tmp_path, app_for):
    db = _copy(small_store, tmp_path)
    holder = _hold_lock(db, 60)
    try:
        at = app_for(db)
        at.run()
        assert not at.exception
        assert "holds the store's write lock" in at.warning[0].value
        assert {m.label: m.value for m in at.metric}["Runs"] == "11"
    finally:
        holder.kill()
        holder.wait()


def test_a_busy_human_study_file_is_read_through_a_snapshot(small_store, tmp_path):
    db = _copy(small_store, tmp_path)
    hs = tmp_path / "human-study.duckdb"
    shutil.copy(small_store.with_name("human-study.duckdb"), hs)
    holder = _hold_lock(hs, 30)
    try:
        with StoreReader(StoreLocation.resolve(db), retries=2, backoff_s=0.05) as reader:
            assert reader.has_human_study
            n = reader.frame("SELECT count(*) AS n FROM hs.human_study_results")["n"][0]
            assert n == 1
    finally:
        holder.kill()
        holder.wait()


def test_cli_runs_streamlit_on_the_app_with_the_store(monkeypatch, tmp_path):
    seen = {}

    def fake_call(cmd, env):
        seen["cmd"], seen["env"] = cmd, env
        return 0

    monkeypatch.setattr(cli.subprocess, "call", fake_call)
    assert cli.main(["--db", str(tmp_path / "x.duckdb"), "--port", "8765", "--headless"]) == 0
    cmd = seen["cmd"]
    assert cmd[1:4] == ["-m", "streamlit", "run"] and cmd[4].endswith("app.py")
    assert cmd[cmd.index("--server.port") + 1] == "8765"
    assert cmd[cmd.index("--server.address") + 1] == "127.0.0.1"
    assert seen["env"][ENV_DB] == str((tmp_path / "x.duckdb").resolve())
    assert seen["env"][ENV_HUMAN_STUDY] == str((tmp_path / "human-study.duckdb").resolve())


def test_t_interval_and_pareto_front_by_hand():
    assert t_half_width(3, 2.0) == pytest.approx(4.302653 * 2 / 3**0.5, rel=1e-6)
    assert t_half_width(1, 0.0) is None
    assert format_mean_ci(12.0, None) == "12 (n=1)"
    # seconds (lower better) vs FD (lower better): (1, 5) dominates (2, 6)
    assert pareto_front([1, 2, 0.5], [5, 6, 9], lower_y_is_better=True) == [True, False, True]
    # higher-is-better quality flips the comparison
    assert pareto_front([1, 2], [5, 6], lower_y_is_better=False) == [True, True]


def test_csv_export_flattens_lists():
    frame = pl.DataFrame({"variation": ["a"], "seeds": [[0, 1, 2]], "mean": [1.5]})
    assert csv_bytes(frame).decode().splitlines() == ["variation,seeds,mean", "a,0 1 2,1.5"]


def test_reader_has_no_time_to_wait_for_a_store_that_is_not_there(tmp_path):
    t0 = time.monotonic()
    assert not StoreReader(StoreLocation.resolve(tmp_path / "none.duckdb")).exists()
    assert time.monotonic() - t0 < 1


WRITER = textwrap.dedent(
    """
    import sys
    from fcr_eval.store import MetricRecord, ResultsStore, RunRecord, RunResult, make_run_id
    store = ResultsStore(sys.argv[1])
    for i in range(int(sys.argv[2])):
        run = RunRecord(run_id=make_run_id("live", f"v{i}", 0, {}), experiment_id="live",
                        variation_id=f"v{i}", seed=0, model="m", dataset="d", sampler="fd",
                        stride=10, scheduler="ddim", resolution=32, num_inference_steps=50,
                        guidance_scale=3.0)
        store.write_run(RunResult(run, metrics=[MetricRecord(f"m{k}", float(k), "fe", "pre", 1)
                                                for k in range(50)]))
    """
)


def test_reading_while_an_experiment_writes_never_shows_half_a_run(tmp_path):
    db = tmp_path / "fcr.duckdb"
    ResultsStore(db)
    n_runs = 25
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(db), str(n_runs)])
    seen = []
    try:
        while writer.poll() is None:
            with StoreReader(StoreLocation.resolve(db)) as reader:
                frame = reader.frame(
                    """SELECT r.run_id, count(m.metric) AS k FROM runs r
                       LEFT JOIN metrics m USING (run_id) GROUP BY r.run_id""")
            assert frame.is_empty() or set(frame["k"].to_list()) == {50}
            seen.append(frame.height)
            time.sleep(0.05)
    finally:
        writer.wait(60)
    assert writer.returncode == 0  # the reader never kept the writer out for good
    assert seen == sorted(seen) and len(set(seen)) >= 2, seen  # it read mid-experiment
    with StoreReader(StoreLocation.resolve(db)) as reader:
        assert reader.frame("SELECT count(*) AS n FROM runs")["n"][0] == n_runs


def test_metric_direction_covers_the_runner_metrics():
    from fcr_results_explorer.queries import lower_is_better

    for lower in ("fid_inception", "fd_efficientnet_lite0", "kid_inception", "clip_drift", "sec_per_image",
                  "finetune_compute_fraction", "peak_memory_bytes"):
        assert lower_is_better(lower), lower
    for higher in ("clip_score", "class_agreement", "inception_score", "precision", "recall"):
        assert not lower_is_better(higher), higher


def test_the_explorers_downloads_neutralise_formulas():
    frame = pl.DataFrame({"variation": ["=HYPERLINK(1)", "fd-10", None], "delta": [-0.5, 0.1, 0.0],
                          "tags": [["=x", "y"], ["a"], []]})
    back = list(csv.DictReader(csv_bytes(frame).decode().splitlines()))
    assert [r["variation"] for r in back] == ["'=HYPERLINK(1)", "fd-10", ""]
    assert [r["delta"] for r in back] == ["-0.5", "0.1", "0.0"]
    assert back[0]["tags"] == "'=x y"
