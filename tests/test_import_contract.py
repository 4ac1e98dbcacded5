"""The layer contract (.importlinter) holds on the tree, and it bites: a forbidden import added to
a copy of the packages breaks it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# slow: lint-imports on copies of the packages
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {  # import name → source folder
    "fcr_sample": ROOT / "packages/fcr-sample/src/fcr_sample",
    "fcr_train": ROOT / "packages/fcr-train/src/fcr_train",
    "fcr_eval": ROOT / "packages/fcr-eval/src/fcr_eval",
    "fcr_results_explorer": ROOT / "apps/results-explorer/src/fcr_results_explorer",
    "fcr_human_study": ROOT / "apps/human-study/src/fcr_human_study",
}


def _lint(cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    lint = Path(sys.executable).with_name("lint-imports")
    return subprocess.run([str(lint), "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _copy_tree(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    for name, folder in SOURCES.items():
        shutil.copytree(folder, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.safetensors", "*.png"))
    shutil.copy(ROOT / ".importlinter", tmp_path / ".importlinter")
    return src


def test_contract_is_kept_on_the_tree():
    r = _lint(ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout


def test_contract_breaks_when_a_metric_imports_the_store(tmp_path):
    src = _copy_tree(tmp_path)
    assert _lint(tmp_path, src).returncode == 0  # the copy itself is clean
    quality = src / "fcr_eval/metrics/quality.py"
    quality.write_text(quality.read_text() + "\nfrom fcr_eval.store import ResultsStore  # noqa: E402,F401\n")
    r = _lint(tmp_path, src)
    assert r.returncode != 0
    assert "fcr_eval.metrics.quality -> fcr_eval.store" in r.stdout


def test_contract_breaks_when_the_spec_imports_torch_or_fcr_sample_imports_ours(tmp_path):
    src = _copy_tree(tmp_path)
    vocab = src / "fcr_eval/spec/vocabulary.py"
    vocab.write_text(vocab.read_text() + "\nimport torch  # noqa: E402,F401\n")
    sched = src / "fcr_sample/schedules.py"
    sched.write_text(sched.read_text() + "\nimport fcr_train  # noqa: E402,F401\n")
    r = _lint(tmp_path, src)
    assert r.returncode != 0
    assert "fcr_eval.spec is not allowed to import torch" in r.stdout
    assert "fcr_sample is not allowed to import fcr_train" in r.stdout


def test_contract_breaks_when_the_report_plans_or_the_store_calls_the_statistics(tmp_path):
    """Run and report are siblings (the report takes replication from the stored runs, not from a
    second plan), and the store, the statistics and the metrics share one floor."""
    src = _copy_tree(tmp_path)
    report = src / "fcr_eval/report/report.py"
    report.write_text(report.read_text() + "\nfrom fcr_eval.plan.planner import make_plan  # noqa: E402,F401\n")
    results = src / "fcr_eval/store/results.py"
    results.write_text(results.read_text() + "\nfrom fcr_eval.analysis.stats import mean_ci  # noqa: E402,F401\n")
    r = _lint(tmp_path, src)
    assert r.returncode != 0
    assert "fcr_eval.report.report -> fcr_eval.plan.planner" in r.stdout
    assert "fcr_eval.store.results -> fcr_eval.analysis.stats" in r.stdout
