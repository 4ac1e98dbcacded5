"""Ids are names, never paths: the one rule (fcr_eval.spec.names) refuses every id that could name
something outside its folder, the experiment loader applies it to every id of a file, and no path
the planner builds from an experiment file leaves the results folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fcr_eval.plan.planner import make_plan
from fcr_eval.spec.experiment import ExperimentFileError, load_experiment
from fcr_eval.spec.names import NAME_MAX, PathEscapeError, is_name, name_problem, safe_child

ROOT = Path(__file__).resolve().parents[3]
TINY = Path(__file__).parents[1] / "experiments" / "tiny.toml"
COMMITTED = sorted((ROOT / "experiments").glob("*.toml")) + [TINY]

# Ids that would be a path, a hidden file, an empty name, a control character or too long a name.
BAD_IDS = ["../escape", "../../../escape", "a/b", "/abs", "..", ".", "", "a\x00b", "x" * (NAME_MAX + 1), " lead",
           "tab\tid", ".hidden", "-dash-first", "back\\slash", "a b"]
GOOD_IDS = ["fd-10", "fcr-0.10-fd-10", "A_b.c-1", "x" * NAME_MAX, "0"]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_the_rule_refuses_every_path_like_id(bad):
    assert not is_name(bad)
    assert name_problem(bad)


@pytest.mark.parametrize("good", GOOD_IDS)
def test_the_rule_accepts_names(good):
    assert is_name(good) and name_problem(good) is None


@pytest.mark.parametrize("part", ["..", ".", "", "a/b", "../x", "a\x00b"])
def test_safe_child_refuses_a_part_that_is_not_one_component(tmp_path, part):
    with pytest.raises(PathEscapeError):
        safe_child(tmp_path, "runs", part)
    assert list(tmp_path.iterdir()) == []  # nothing created


def test_safe_child_refuses_a_symlink_out_of_the_root(tmp_path):
    root, outside = tmp_path / "results", tmp_path / "elsewhere"
    root.mkdir()
    outside.mkdir()
    os.symlink(outside, root / "runs")
    with pytest.raises(PathEscapeError, match="outside"):
        safe_child(root, "runs", "exp")
    assert safe_child(root, "plots", "exp") == root / "plots" / "exp"


def _ids_toml(where: str, bad: str) -> str:
    text = TINY.read_text()
    quoted = '"' + bad.replace("\\", "\\\\").replace("\x00", "\\u0000").replace("\t", "\\t") + '"'
    edits = {
        "experiment": ('id = "tiny-exp"', f"id = {quoted}"),
        "variation": ('id = "no-cache"', f"id = {quoted}"),
        "contrast": ('id = "tiny-stride-gap"', f"id = {quoted}"),
        "profile": ("[profiles.one-seed]", f"[profiles.{quoted}]"),
        "model": ('id = "tiny"\nsource', f"id = {quoted}\nsource"),
    }
    old, new = edits[where]
    assert old in text
    text = text.replace(old, new)
    if where == "model":
        text = text.replace("[[variations]]\nid", f"[[variations]]\nmodel = {quoted}\nid")
    return text


@pytest.mark.parametrize("where", ["experiment", "variation", "contrast", "profile", "model"])
@pytest.mark.parametrize("bad", ["../../../escape", "", "a\x00b", "x" * 300])
def test_every_id_of_a_file_follows_the_rule(tmp_path, where, bad):
    path = tmp_path / "exp.toml"
    path.write_text(_ids_toml(where, bad))
    with pytest.raises(ExperimentFileError, match=r"exp\.toml:\d+: .*an id is 1-64 characters"):
        load_experiment(path)


def test_an_expanded_variation_id_follows_the_rule(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text(TINY.read_text().replace('id = "fcr-0.10-fd-{stride}"', 'id = "fcr/{stride}"'))
    with pytest.raises(ExperimentFileError, match=r"variations\[4\]\.id \(from 'fcr/\{stride\}'\) = 'fcr/2' is not"):
        load_experiment(path)


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: p.name)
def test_no_planned_path_leaves_the_results_folder(tmp_path, path):
    """Every run folder and fine-tune folder of every committed experiment, in every profile,
    resolves to a path under the store's folder."""
    results = (tmp_path / "results").resolve()
    base = load_experiment(path)
    for profile in (None, *base.profiles):
        plan = make_plan(load_experiment(path, profile), results_dir=results, calibrate=False, gflops_per_s=1.0)
        dirs = [r.run_dir for r in plan.runs] + [f.output_dir for f in plan.finetunes.values()]
        assert dirs
        for d in dirs:
            assert Path(d).resolve().is_relative_to(results / "runs"), d
    assert not results.exists()  # planning creates nothing
