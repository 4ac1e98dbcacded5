"""The report reads the store and nothing else: it opens it read-only (the file is byte for byte
the same afterwards, no verdict is written), and each contrast's replication comes from the
weights the stored runs sampled — not from a second plan."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from fcr_eval.report.report import report, stored_weights
from fcr_eval.spec.experiment import load_experiment
from fcr_eval.spec.vocabulary import INDEPENDENT_FINETUNES, SHARED_FINETUNE
from fcr_eval.store import (
    MetricRecord,
    ResultsStore,
    RunRecord,
    RunResult,
    SampleMetrics,
    make_run_id,
)

EXPERIMENT = """
seeds = [0, 1, 2]

[experiment]
id = "report-exp"
description = "two fine-tuned variations and a base one"

[[models]]
id = "tiny"
source = "embedded-tiny"

[[datasets]]
id = "train"
kind = "fashion-mnist"
role = "finetune"
limit = 64

[sampling]
num_inference_steps = 4
n_samples = 8

[finetune]
data = "train"
steps = 2
batch_size = 4

[evaluation]
metrics = ["fd"]
n_reference = 24

[[variations]]
id = "fd-2"
sampler = "fd"
stride = 2

[[variations]]
id = "ft-fd-4"
sampler = "fd"
stride = 4
lambda_fcr = 0.0

[[variations]]
id = "fcr-fd-4"
sampler = "fd"
stride = 4
lambda_fcr = 0.1

[[contrasts]]
id = "fcr-vs-control"
kind = "difference"
metric = "cache_mse"
candidate = "fcr-fd-4"
baseline = "ft-fd-4"
"""


def _store(tmp_path: Path, per_seed: bool, metrics: tuple = ()) -> tuple[Path, object]:
    path = tmp_path / "exp.toml"
    path.write_text(EXPERIMENT)
    exp = load_experiment(path)
    store_path = tmp_path / "results" / "fcr.duckdb"
    store = ResultsStore(store_path)
    rng = np.random.default_rng(0)
    for v in exp.variations:
        for seed in exp.seeds:
            finetune = None
            if v.lambda_fcr is not None:  # the stored config names the fine-tune the run sampled
                finetune = {"key": f"ft-{v.id}-s{seed if per_seed else 0}"}
            config = {"variation": {"model": v.model}, "finetune": finetune}
            run = RunRecord(make_run_id(exp.id, v.id, seed, config), exp.id, v.id, seed, "embedded-tiny",
                            "fashion-mnist", "fd", "ddim", 28, 4, 2.0, stride=v.stride, config=config)
            values = rng.normal(0.1 if v.id == "fcr-fd-4" else 0.2, 0.01, 8)
            store.write_run(RunResult(run, metrics=list(metrics),
                                      sample_metrics=[SampleMetrics("cache_mse", values, list(range(8)), seeds=seed)]))
    return store_path, exp


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(("per_seed", "expected"), [(True, INDEPENDENT_FINETUNES), (False, SHARED_FINETUNE)])
def test_the_report_takes_replication_from_the_stored_runs_and_writes_nothing(tmp_path, capsys, per_seed, expected):
    store_path, exp = _store(tmp_path, per_seed)
    before = _digest(store_path)
    rep = report(exp, store_path, plots=False)
    assert _digest(store_path) == before  # opened read-only: not a byte changed
    reader = ResultsStore.open_readonly(store_path)
    assert reader.contrasts(exp.id).height == 0 and reader.criteria(exp.id).height == 0
    (contrast,) = rep.contrasts
    assert contrast.details["replication"] == expected
    assert contrast.estimate == pytest.approx(-0.1, abs=0.02)
    out = capsys.readouterr().out
    assert "fcr-vs-control" in out and expected in out


def test_stored_weights_name_the_finetune_or_the_base_model(tmp_path):
    store_path, exp = _store(tmp_path, per_seed=True)
    rows = {(w.variation, w.seed): w for w in stored_weights(ResultsStore.open_readonly(store_path), exp)}
    assert len(rows) == 9
    assert rows["fd-2", 1].weights == "base:tiny" and not rows["fd-2", 1].finetuned
    assert rows["fcr-fd-4", 2].weights == "ft-fcr-fd-4-s2" and rows["fcr-fd-4", 2].finetuned


def test_plots_leave_out_a_cache_without_a_stride_and_draw_the_rest(tmp_path, monkeypatch):
    """An adaptive cache has no stride: the stride plots leave it out (before, its ``None`` stride
    was sorted with the integer ones and the report failed with a TypeError)."""
    global EXPERIMENT
    adaptive = EXPERIMENT + '\n[[variations]]\nid = "adaptive"\nsampler = "adaptive-deepcache"\nthreshold = 0.2\n'
    monkeypatch.setattr(f"{__name__}.EXPERIMENT", adaptive)
    store_path, exp = _store(tmp_path, per_seed=True, metrics=(MetricRecord("unet_calls", 1.0, "none", "none", 8),))
    assert any(v.sampler == "adaptive-deepcache" and v.stride is None for v in exp.variations)
    report(exp, store_path, plots=True)
    drawn = {p.name for p in (store_path.parent / "plots").rglob("*.png")}
    assert "cache_error_vs_stride.png" in drawn


@pytest.mark.parametrize(("file", "named", "not_named"), [
    ("tiny.toml", "Fashion-MNIST classifier", "emoji-group classifier"),
    ("tiny-emoji.toml", "emoji-group classifier", "Fashion-MNIST classifier"),
])
def test_the_set_level_table_names_the_classifier_of_the_experiments_backbone(file, named, not_named):
    from fcr_eval.report.report import _table_notes

    notes = _table_notes(load_experiment(Path(__file__).parents[1] / "experiments" / file))
    assert named in notes and not_named not in notes


def test_after_a_run_the_contrast_plots_show_that_runs_contrasts(tmp_path, monkeypatch):
    """``fcr-eval run`` keeps the verdicts before it draws: the forest plots read the stored
    contrasts, and drawn first (as before) the first run's plots held none of its contrasts."""
    import fcr_eval.report.plots as plots
    from fcr_eval.cli import _report_after_run

    store_path, exp = _store(tmp_path, per_seed=True, metrics=(MetricRecord("unet_calls", 1.0, "none", "none", 8),))
    drawn = []
    real = plots._contrast_forest

    def spy(exp_, rows, *args, **kw):
        drawn.extend(rows["contrast_id"].to_list())
        return real(exp_, rows, *args, **kw)

    monkeypatch.setattr(plots, "_contrast_forest", spy)
    _report_after_run(exp, store_path, plots=True)
    assert drawn == ["fcr-vs-control"]
    assert ResultsStore.open_readonly(store_path).contrasts(exp.id)["contrast_id"].to_list() == ["fcr-vs-control"]
