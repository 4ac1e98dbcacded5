"""MovingValidation: the moving early-stopping metric keeps its window across a resumed fine-tune."""

import json
import math

import pytest
import torch
from fcr_eval.run import early_stopping
from fcr_eval.run.early_stopping import MovingValidation
from fcr_train.api import DataConfig, FinetuneConfig, finetune
from fcr_train.loss import FCRConfig
from fcr_train.trainer import TrainConfig, latest_checkpoint


def _from_table(table):
    calls = []

    def fn(unet, step):
        calls.append(step)
        return table[step]

    fn.calls = calls
    return fn


# --- unit ------------------------------------------------------------------------------------


def test_moving_mean_over_the_last_window_values(tmp_path):
    mv = MovingValidation(_from_table({1: 4.0, 2: 2.0, 3: 6.0, 4: 1.0}), 3, tmp_path / "h.json")
    assert [mv(None, s) for s in (1, 2, 3, 4)] == [4.0, 3.0, 4.0, 3.0]
    assert mv.history == [(1, 4.0), (2, 2.0), (3, 6.0), (4, 1.0)]


def test_history_persists_to_a_new_instance(tmp_path):
    path = tmp_path / "run" / "h.json"  # the folder is made when missing
    first = MovingValidation(_from_table({2: 4.0, 4: 2.0}), 3, path)
    first(None, 2)
    first(None, 4)
    second = MovingValidation(_from_table({6: 6.0}), 3, path)
    assert second.history == [(2, 4.0), (4, 2.0)]
    assert second(None, 6) == 4.0  # the window holds the earlier instance's values
    data = json.loads(path.read_text())
    assert data["history"] == [{"step": 2, "value": 4.0}, {"step": 4, "value": 2.0}, {"step": 6, "value": 6.0}]
    assert data["window"] == 3
    assert [p.name for p in path.parent.iterdir()] == ["h.json"]  # no temporary files left


@pytest.mark.parametrize("resumed_at, kept", [(4, [2]), (6, [2, 4]), (7, [2, 4, 6])])
def test_entries_at_or_after_the_resumed_step_are_recomputed(tmp_path, resumed_at, kept):
    path = tmp_path / "h.json"
    before = MovingValidation(_from_table({2: 1.0, 4: 2.0, 6: 3.0}), 10, path)
    for s in (2, 4, 6):
        before(None, s)
    after = MovingValidation(_from_table({resumed_at: 10.0}), 10, path)
    got = after(None, resumed_at)
    old = {2: 1.0, 4: 2.0, 6: 3.0}
    assert after.history == [(s, old[s]) for s in kept] + [(resumed_at, 10.0)]
    assert got == pytest.approx((sum(old[s] for s in kept) + 10.0) / (len(kept) + 1))
    assert MovingValidation(_from_table({}), 10, path).history == after.history


def test_missing_file_starts_empty(tmp_path):
    mv = MovingValidation(_from_table({5: 3.0}), 2, tmp_path / "none.json")
    assert mv.history == [] and not (tmp_path / "none.json").exists()
    assert mv(None, 5) == 3.0 and (tmp_path / "none.json").is_file()


@pytest.mark.parametrize("text", [
    '{"format": "fcr-moving-validation", "version": 1, "history": [{"step": 2, "val',  # cut off mid-write
    "",
    "[1, 2]",
    '{"format": "something-else", "version": 1, "history": []}',
    '{"format": "fcr-moving-validation", "version": 9, "history": []}',
    '{"format": "fcr-moving-validation", "version": 1, "history": [{"step": 2}]}',
    '{"format": "fcr-moving-validation", "version": 1, "history": [{"step": "2", "value": 1.0}]}',
    '{"format": "fcr-moving-validation", "version": 1, "history": [{"step": 2, "value": NaN}]}',
    '{"format": "fcr-moving-validation", "version": 1, "history": [{"step": 4, "value": 1}, {"step": 2, "value": 1}]}',
])
def test_corrupt_file_is_a_clear_error_naming_it(tmp_path, text):
    path = tmp_path / "moving_fd_history.json"
    path.write_text(text)
    with pytest.raises(ValueError, match="moving_fd_history.json: not a readable moving-validation history"):
        MovingValidation(_from_table({}), 3, path)


def test_non_finite_metric_is_refused_and_not_recorded(tmp_path):
    path = tmp_path / "h.json"
    mv = MovingValidation(_from_table({1: 1.0, 2: math.nan}), 3, path)
    mv(None, 1)
    with pytest.raises(ValueError, match="at step 2 is nan"):
        mv(None, 2)
    assert mv.history == [(1, 1.0)] and MovingValidation(_from_table({}), 3, path).history == [(1, 1.0)]


def test_a_failed_write_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "h.json"
    mv = MovingValidation(_from_table({1: 1.0, 2: 2.0}), 3, path)
    mv(None, 1)
    before = path.read_text()

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(early_stopping.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        mv(None, 2)
    assert path.read_text() == before and [p.name for p in tmp_path.iterdir()] == ["h.json"]
    assert mv.history == [(1, 1.0)]


def test_window_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="window"):
        MovingValidation(_from_table({}), 0, tmp_path / "h.json")


# --- with the real trainer --------------------------------------------------------------------

# Validations every 2 steps. The schedule makes the moving mean (window 3) fall to its best at
# step 8 and rise after, so patience 2 stops the run at step 12; the weight-norm term makes every
# value depend on the trained weights, so a resume that restored them wrongly would show.
_BUMP = {2: 5.0, 4: 3.0, 6: 1.0, 8: 2.0, 10: 4.0, 12: 6.0, 14: 8.0, 16: 10.0, 18: 12.0, 20: 14.0}


def _weight_metric(unet, step):
    norm = torch.sqrt(sum(p.detach().double().pow(2).sum() for p in unet.parameters()))
    return _BUMP[step] + 1e-3 * float(norm)


def _config(out, max_steps=20):
    return FinetuneConfig(model="embedded-tiny", data=DataConfig(limit=48), train=TrainConfig(
        output_dir=str(out), max_steps=max_steps, batch_size=4, lr=1e-3, checkpoint_every=100, validate_every=2,
        early_stopping_patience=2, seed=3, resume=True, progress=False, cpu=True, fcr=FCRConfig(lam=0.1, delta_max=5)))


class _Crash(Exception):
    pass


def _run(out, seen, max_steps=20, crash_after_validation_at=None):
    """One process's fine-tune with a fresh MovingValidation on the run folder's history file;
    ``seen[step]`` gets the value handed to the trainer. ``crash_after_validation_at``: die after
    that step's validation is recorded in the history file but before the trainer checkpoints it."""
    mv = MovingValidation(_weight_metric, 3, out / "moving_fd_history.json")

    def validation_fn(unet, step):
        value = mv(unet, step)
        if step == crash_after_validation_at:
            raise _Crash
        seen[step] = value
        return value

    return finetune(_config(out, max_steps), validation_fn=validation_fn)


def _validation_log(out):
    return [json.loads(x) for x in (out / "validation.jsonl").read_text().splitlines()]


def test_resumed_fine_tune_sees_the_same_moving_values(tmp_path):
    torch.set_num_threads(1)
    full_seen = {}
    full = _run(tmp_path / "full", full_seen)
    assert full.stopped_early and full.steps == 12 and full.best_checkpoint.name == "step_0000008"

    out, seen = tmp_path / "cut", {}
    # 1: dies at step 6 after the history recorded step 6 but before its checkpoint;
    with pytest.raises(_Crash):
        _run(out, seen, crash_after_validation_at=6)
    assert latest_checkpoint(out).name == "step_0000004"
    assert [s for s, _ in MovingValidation(_weight_metric, 3, out / "moving_fd_history.json").history] == [2, 4, 6]
    # 2: resumed from step 4 (redoes step 6), ends at max_steps=10 right after a validation
    # without improvement; 3: resumed from step 10, runs until early stopping.
    assert _run(out, seen, max_steps=10).steps == 10
    resumed = _run(out, seen)

    assert seen == full_seen  # every moving value the trainer got, exactly (floats compared with ==)
    assert (resumed.stopped_early, resumed.steps, resumed.best_metric) == (True, 12, full.best_metric)
    assert resumed.best_checkpoint.name == "step_0000008"
    assert _validation_log(out) == _validation_log(tmp_path / "full")  # step, value, best, best_step
    assert json.loads((out / "moving_fd_history.json").read_text()) == json.loads(
        (tmp_path / "full" / "moving_fd_history.json").read_text())
