"""Both apps open their DuckDB files through fcr_eval.store.db: a path that is not a store is the same
clear StoreUnreadableError there as in the results store, and reading creates nothing."""

from __future__ import annotations

import pytest
from fcr_eval.store.db import StoreUnreadableError
from fcr_human_study.store import StudyStore, StudyStoreError
from fcr_results_explorer.reader import StoreLocation, StoreReader, StoreUnavailable

CASES = {
    "random bytes": ("random.duckdb", "is not a DuckDB database"),
    "directory": ("a-folder", "is a directory"),
    "missing folder": ("no/such/fcr.duckdb", "does not exist"),
    "missing file": ("missing.duckdb", "nothing was created"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_app_stores_refuse_a_bad_path_for_reading(tmp_path, case):
    name, expected = CASES[case]
    (tmp_path / "random.duckdb").write_bytes(bytes(range(256)) * 32)
    (tmp_path / "a-folder").mkdir()
    path = tmp_path / name
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(StudyStoreError) as study_error:
        StudyStore(path, read_only=True)
    with pytest.raises(StoreUnavailable) as reader_error:
        StoreReader(StoreLocation.resolve(path)).tables()
    for err in (study_error.value, reader_error.value):
        assert isinstance(err, StoreUnreadableError) and expected in str(err) and str(path) in str(err)
        assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__)
    assert sorted(tmp_path.rglob("*")) == before  # nothing created
