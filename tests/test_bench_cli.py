"""benchmarks/bench_cli.py: where a benchmark writes, decided and checked before it starts."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_cli  # noqa: E402
from bench_cli import UserError, output_folder, report_file  # noqa: E402


def test_the_default_is_a_fresh_folder_that_is_not_made_yet(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench_cli, "BENCH_ROOT", tmp_path / "bench")
    first = output_folder(None, "mechanism", ("rows.csv",))
    assert first.parent == tmp_path / "bench" and first.name.startswith("mechanism-")
    assert not first.exists()
    assert f"results go to {first}" in capsys.readouterr().err
    first.mkdir(parents=True)  # a run in the same second gets another folder
    second = output_folder(None, "mechanism", ("rows.csv",))
    assert second != first and not second.exists()


def test_an_explicit_folder_is_used_and_the_replaced_files_named(tmp_path, capsys):
    (tmp_path / "rows.csv").write_text("old")
    assert output_folder(tmp_path, "mechanism", ("rows.csv", "results.json")) == tmp_path
    err = capsys.readouterr().err
    assert "is an existing folder: this run replaces its rows.csv" in err and "results.json" not in err
    assert (tmp_path / "rows.csv").read_text() == "old"  # nothing written at the start
    new = tmp_path / "new" / "deeper"
    assert output_folder(new, "mechanism") == new and not new.exists()


def test_a_file_where_a_folder_goes_and_the_reverse_are_refused(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        output_folder(f, "mechanism")
    with pytest.raises(UserError, match="is a folder; it takes the report's file"):
        report_file(tmp_path)
    with pytest.raises(UserError, match="is a file, not a folder"):
        report_file(f / "report.md")
    assert report_file(None) is None
    assert report_file(tmp_path / "sub" / "r.md") == tmp_path / "sub" / "r.md"
