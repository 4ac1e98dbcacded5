"""CSV exports open in a spreadsheet as data: no text cell starts a formula."""

from __future__ import annotations

import csv

import pytest
from fcr_eval.store.csv_export import spreadsheet_safe, write_csv

FORMULAS = ['=HYPERLINK("http://evil.example","x")', "+1+1", "-2+3", "@SUM(A1)", "\t=1", "\r=1",
            "=cmd|' /C calc'!A0"]


@pytest.mark.parametrize("text", FORMULAS)
def test_formula_text_gets_a_leading_quote(text):
    assert spreadsheet_safe(text) == "'" + text


@pytest.mark.parametrize("value", ["a photo of a cat", "fd-10", "", "'quoted", " =1", -3, 2.5, None, True])
def test_other_values_are_unchanged(value):
    assert spreadsheet_safe(value) is value or spreadsheet_safe(value) == value


def test_write_csv_neutralises_text_cells_only(tmp_path):
    rows = [{"label": f, "seed": -3, "prompt": "a cat"} for f in FORMULAS]
    path = write_csv(tmp_path / "x.csv", rows, ["label", "seed", "prompt"])
    with path.open(newline="") as f:
        back = list(csv.DictReader(f))
    assert [r["label"] for r in back] == ["'" + t for t in FORMULAS]
    assert {r["seed"] for r in back} == {"-3"} and {r["prompt"] for r in back} == {"a cat"}

