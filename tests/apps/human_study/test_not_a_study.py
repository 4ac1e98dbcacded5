"""A file that is not a study is refused as "not a study file", by readers and writers alike, and
nothing is written to it (a writer would otherwise migrate the study's tables into it)."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest
from fcr_human_study.store import NotAStudyFileError, StudyStore


def _foreign(tmp_path: Path, kind: str, results_store: Path) -> tuple[Path, str]:
    if kind == "results store":
        return results_store, "it is a results store"
    if kind == "text file":
        path = tmp_path / "notes.txt"
        path.write_text("not a database\n")
        return path, "it is not a DuckDB database"
    path = tmp_path / "other.duckdb"
    with duckdb.connect(str(path)) as con:
        con.execute("CREATE TABLE inventory (item VARCHAR)")
    return path, "it is a DuckDB database with other tables (inventory)"


@pytest.mark.parametrize("read_only", [True, False], ids=["reader", "writer"])
@pytest.mark.parametrize("kind", ["results store", "text file", "other DuckDB"])
def test_a_file_that_is_not_a_study_is_refused_and_left_alone(tmp_path, results_store, kind, read_only):
    path, why = _foreign(tmp_path, kind, results_store)
    before = path.read_bytes()
    with pytest.raises(NotAStudyFileError) as e:
        StudyStore(path, read_only=read_only)
    assert f"{path} is not a study file: {why}" in str(e.value)
    assert "fcr-human-study build --out" in str(e.value)
    assert path.read_bytes() == before
    if kind != "text file":
        with duckdb.connect(str(path), read_only=True) as con:
            tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        assert "study" not in tables and "votes" not in tables


def test_an_empty_duckdb_file_is_a_study_for_a_writer_not_for_a_reader(tmp_path):
    path = tmp_path / "new.duckdb"
    duckdb.connect(str(path)).close()
    with pytest.raises(NotAStudyFileError, match="it is an empty DuckDB database"):
        StudyStore(path, read_only=True)
    StudyStore(path).close()  # a writer makes it a study (as build does)
    reader = StudyStore(path, read_only=True)
    assert reader.query("SELECT count(*) FROM votes") == [(0,)]
    reader.close()
