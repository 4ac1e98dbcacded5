"""benchmarks/exp1_stages.py: the experiment it runs is exp-1's quick profile (its sampler and
evaluation, the base variations), stage times are exclusive, and bad arguments are refused before
anything is built. (The whole CPU smoke path takes minutes: `bash benchmarks/gpu.sh --dry-run`.)"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import exp1_stages  # noqa: E402
from fcr_eval.spec.experiment import load_experiment  # noqa: E402


def test_the_experiment_is_exp1_quick_with_local_parts(tmp_path):
    inception, clip, coco = tmp_path / "inception.pt", tmp_path / "clip", tmp_path / "coco" / "captions.json"
    path = tmp_path / "exp.toml"
    path.write_text(exp1_stages.experiment_toml(tmp_path, 48, False, inception, clip, coco))
    exp = load_experiment(path)
    quick = load_experiment(exp1_stages.EXP1, "quick")
    for field in ("num_inference_steps", "guidance_scale", "resolution", "batch_size", "scheduler", "dtype"):
        assert getattr(exp.sampling, field) == getattr(quick.sampling, field), field
    assert exp.sampling.n_samples == 48
    assert exp.evaluation.metrics == tuple(m for m in quick.evaluation.metrics if m != "finetune_compute")
    assert (exp.evaluation.timing_batch_sizes, exp.evaluation.timing_repeats) == (
        quick.evaluation.timing_batch_sizes, quick.evaluation.timing_repeats)
    assert exp.evaluation.inception_weights == str(inception) and exp.evaluation.clip_model == str(clip)
    assert [(v.id, v.sampler, v.stride) for v in exp.variations] == [("fd-5-baseline", "fd", 5),
                                                                     ("fd-10-baseline", "fd", 10)]


def test_stage_times_are_exclusive_and_nested_calls_can_inherit(monkeypatch):
    monkeypatch.setattr(exp1_stages, "sync", lambda: None)
    clock = exp1_stages.StageClock()

    class Work:
        @staticmethod
        def inner():
            time.sleep(0.05)

        @staticmethod
        def outer():
            time.sleep(0.05)
            Work.inner()

        @staticmethod
        def sample():
            time.sleep(0.02)

    clock.wrap(Work, "inner", "inner")
    clock.wrap(Work, "outer", "outer")
    clock.wrap(Work, "sample", "sampling", inherit=("reference",))
    Work.outer()
    Work.sample()
    with clock.stage("reference"):
        Work.sample()
    s = clock.seconds
    assert s["outer"] == pytest.approx(0.05, abs=0.03) and s["inner"] == pytest.approx(0.05, abs=0.03)
    assert s["sampling"] == pytest.approx(0.02, abs=0.015) and s["reference"] == pytest.approx(0.02, abs=0.015)


def test_every_timed_function_is_in_the_runner():
    targets = exp1_stages.timed_targets()  # raises AttributeError naming a renamed function
    assert {stage for *_, stage, _ in targets} >= {"sampling", "reference", "features", "metrics", "store"}


def test_bad_arguments_are_refused_before_any_work(tmp_path, capsys):
    assert exp1_stages.run(exp1_stages.main, ["--device", "cpu", "--out", str(tmp_path / "a")]) == 2
    assert "add --tiny" in capsys.readouterr().err and not (tmp_path / "a").exists()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "fcr.duckdb").write_text("x")
    assert exp1_stages.run(exp1_stages.main, ["--device", "cpu", "--tiny", "--out", str(tmp_path / "b")]) == 2
    assert "holds files of an earlier run" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:  # argparse's range check
        exp1_stages.run(exp1_stages.main, ["--samples", "2", "--device", "cpu", "--tiny"])
    assert stop.value.code == 2 and "it must be at least 8" in capsys.readouterr().err
