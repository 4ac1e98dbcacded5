"""The shared DuckDB helper: clear errors for paths that are not a database, reading never
creates a file, lock back-off names the holder, one transaction block."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import duckdb
import pytest
from fcr_eval.store import ResultsStore
from fcr_eval.store.db import (
    StoreError,
    StoreLockedError,
    StoreUnreadableError,
    connect,
    transaction,
)


def _random_bytes_file(path):
    path.write_bytes(os.urandom(8192))
    return path


def _bad_paths(tmp_path):
    (tmp_path / "a-folder").mkdir()
    return {
        "random bytes": (_random_bytes_file(tmp_path / "random.duckdb"), "is not a DuckDB database"),
        "directory": (tmp_path / "a-folder", "is a directory"),
        "missing folder": (tmp_path / "no" / "such" / "fcr.duckdb", "does not exist"),
        "missing file": (tmp_path / "missing.duckdb", "nothing was created"),
    }


def _assert_clean(err: BaseException, expected: str) -> None:
    assert isinstance(err, StoreUnreadableError) and isinstance(err, StoreError)
    assert expected in str(err)
    # no raw DuckDB exception chained behind the message
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__)


@pytest.mark.parametrize("case", ["random bytes", "directory", "missing folder", "missing file"])
def test_reading_a_path_that_is_not_a_store_is_one_clear_error(tmp_path, case):
    path, expected = _bad_paths(tmp_path)[case]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(StoreUnreadableError) as info:
        connect(path, read_only=True, describe="results store")
    _assert_clean(info.value, expected)
    assert str(path) in str(info.value)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing created


@pytest.mark.parametrize("case", ["random bytes", "directory", "missing folder", "missing file"])
def test_the_results_store_refuses_a_bad_path_for_reading(tmp_path, case):
    path, expected = _bad_paths(tmp_path)[case]
    with pytest.raises(StoreUnreadableError) as info:
        ResultsStore.open_readonly(path)
    _assert_clean(info.value, expected)
    assert not (tmp_path / "missing.duckdb").exists() and not (tmp_path / "no").exists()


@pytest.mark.parametrize("case", ["random bytes", "directory"])
def test_a_writer_refuses_a_bad_path_and_leaves_it_as_it_was(tmp_path, case):
    path, expected = _bad_paths(tmp_path)[case]
    before = path.read_bytes() if path.is_file() else None
    with pytest.raises(StoreUnreadableError) as info:
        ResultsStore(path)
    _assert_clean(info.value, expected)
    assert (path.read_bytes() if path.is_file() else None) == before


def test_a_writer_creates_a_new_file_and_reading_then_works(tmp_path):
    path = tmp_path / "new.duckdb"
    with connect(path) as con:
        con.execute("CREATE TABLE t (x INTEGER)")
    with connect(path, read_only=True) as con:
        assert con.execute("SELECT count(*) FROM t").fetchone() == (0,)


def test_transaction_commits_or_rolls_back(tmp_path):
    with connect(tmp_path / "t.duckdb") as con:
        con.execute("CREATE TABLE t (x INTEGER)")
        with transaction(con):
            con.execute("INSERT INTO t VALUES (1)")
        with pytest.raises(RuntimeError, match="simulated"), transaction(con):
            con.execute("INSERT INTO t VALUES (2)")
            raise RuntimeError("simulated")
        assert con.execute("SELECT x FROM t").fetchall() == [(1,)]
        with transaction(con):  # the connection is usable again after a rollback
            con.execute("INSERT INTO t VALUES (3)")
        assert con.execute("SELECT x FROM t ORDER BY x").fetchall() == [(1,), (3,)]


HOLD = "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); print('ok', flush=True); time.sleep(float(sys.argv[2]))"


def _hold(path, seconds):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ok"
    return proc


def test_a_held_file_is_waited_for_then_refused_naming_the_holder(tmp_path):
    path = tmp_path / "held.duckdb"
    duckdb.connect(str(path)).close()
    holder = _hold(path, 30)
    try:
        t0 = time.monotonic()
        with pytest.raises(StoreLockedError) as info:
            connect(path, read_only=True, timeout=0.4, describe="results store")
        assert time.monotonic() - t0 >= 0.4
        assert info.value.holder_pid == str(holder.pid) and f"PID {holder.pid}" in str(info.value)
        assert "stayed busy for 0.4 s" in str(info.value)
    finally:
        holder.kill()
        holder.wait()


def test_a_short_hold_is_waited_out(tmp_path):
    path = tmp_path / "held.duckdb"
    duckdb.connect(str(path)).close()
    holder = _hold(path, 0.3)
    try:
        with connect(path, timeout=10) as con:  # the back-off outlasts the holder
            assert con.execute("SELECT 1").fetchone() == (1,)
    finally:
        holder.wait()
