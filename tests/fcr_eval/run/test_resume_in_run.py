"""Resume inside a run: a runner killed (SIGKILL, a real process) partway through a run's batches
resumes at its first unfinished batch, redoes at most the one batch each process was on, writes
no batch twice, and stores the same rows as an uninterrupted run — with one process and with two
(torchrun, gloo on CPU). A run folder of another configuration is refused in one line."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fcr_eval.cli import main
from fcr_eval.store import ResultsStore

# slow: real processes are started, killed and resumed
pytestmark = pytest.mark.slow

N, BATCH = 16, 2
EXPERIMENT = f"""
seeds = [0]
[experiment]
id = "resume-exp"
description = "a run killed between its batches"

[[models]]
id = "tiny"
source = "embedded-tiny"

[[datasets]]
id = "test"
kind = "fashion-mnist"
role = "reference"
split = "test"

[sampling]
num_inference_steps = 12
guidance_scale = 2.0
batch_size = {BATCH}
n_samples = {N}

[evaluation]
metrics = ["fd", "kid", "precision_recall", "class_agreement"]
feature_image_size = 32
reference = "test"
n_reference = 24
kid_subset_size = 8
grid_per_class = 1
save_samples = 5

[[variations]]
id = "no-cache"

[[variations]]
id = "fd-2"
sampler = "fd"
stride = 2
"""
BATCH_LINE = re.compile(r"fd-2 s0: batch (\d+)/(\d+) \(samples \d+-\d+\) finished")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _rows(store: Path) -> dict:
    """Every stored number of the experiment but the wall times, keyed for comparison."""
    s = ResultsStore.open_readonly(store)
    out = {}
    for table, key, val in (
        ("sample_metrics", "variation_id, metric, sample_index", "value"),
        ("per_prompt_scores", "variation_id, metric, prompt_id", "value"),
        ("metrics", "variation_id, metric", "value"),
        ("samples", "variation_id, prompt_id", "image_path"),
    ):
        df = s.sql(f"SELECT {key}, {val} AS v FROM {table} JOIN runs USING (run_id) "
                   "WHERE coalesce(metric, '') NOT LIKE 'sample_wall%'" if table != "samples" else
                   f"SELECT {key}, {val} AS v FROM {table} JOIN runs USING (run_id)")
        for r in df.iter_rows():
            out[(table, *r[:-1])] = r[-1]
    return out


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (torchrun starts its workers in sessions of their own, so a
    process-group kill would miss them)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _kill_all(pid: int) -> None:
    for p in _tree(pid):  # no chance to clean up: the hardest interruption
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _kill_partway(cmd: list[str], batches_dir: Path, after: int, timeout: float = 400) -> tuple[set[int], set[int]]:
    """Start ``cmd``, SIGKILL its whole process group once the log says fd-2's batch ``after``
    finished; returns (fd-2 batches logged finished, fd-2 batch files on disk)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    logged: set[int] = set()
    deadline = time.monotonic() + timeout
    try:
        for line in proc.stderr:
            m = BATCH_LINE.search(line)
            if m:
                logged.add(int(m.group(1)) - 1)
                if len(logged) >= after:
                    _kill_all(proc.pid)
                    break
            assert time.monotonic() < deadline, "no fd-2 batch finished in time"
        else:
            pytest.fail(f"the runner ended before fd-2 had {after} batches (exit {proc.wait()})")
    finally:
        if proc.poll() is None:
            _kill_all(proc.pid)
        proc.wait(timeout=60)
    on_disk = {int(p.stem[1:]) for p in batches_dir.glob("b*.pkl")}
    return logged, on_disk


def _resume(cmd: list[str]) -> tuple[list[int], str]:
    """Run ``cmd`` to the end; fd-2 batches it logged finished (in order) and its stderr."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [int(m.group(1)) - 1 for m in BATCH_LINE.finditer(proc.stderr)], proc.stderr


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("whole")
    exp_path = tmp / "resume.toml"
    exp_path.write_text(EXPERIMENT)
    store = tmp / "whole" / "fcr.duckdb"
    # a process like the killed ones (same BLAS threads): set-level metrics of 16 samples in 1280
    # dimensions move in the 10th digit with the BLAS's summation order
    _resume([sys.executable, "-m", "fcr_eval.cli", "run", str(exp_path), "--store", str(store), "--threads", "1",
             "--device", "cpu", "--no-plots"])
    return exp_path, _rows(store)


def _check_resumed(store: Path, before_logged: set[int], before_files: set[int], redone: list[int],
                   processes: int, whole: dict) -> None:
    k = N // BATCH
    assert before_logged <= before_files, "a batch logged as finished was not durable"
    assert len(before_files) < k, "the kill came after the run's last batch"
    assert len(redone) == len(set(redone)), "a batch was done twice in the resumed run"
    assert set(redone) == set(range(k)) - before_files, "the resumed run redid a finished batch or skipped one"
    # Each process does its batches in order (batch b is process b mod P's), so what it redoes is
    # a tail of its list: the batch it was on when killed, and those it had not started.
    for p in range(processes):
        mine = list(range(p, k, processes))
        missing = [b for b in mine if b not in before_files]
        assert missing == mine[len(mine) - len(missing):], (p, sorted(before_files))
    got = _rows(store)
    assert got.keys() == whole.keys()
    diff = {key: (got[key], whole[key]) for key in whole if got[key] != whole[key]}
    assert not diff, list(diff.items())[:5]
    s = ResultsStore.open_readonly(store)
    assert s.sql("SELECT count(*) AS n FROM sample_metrics JOIN runs USING (run_id) WHERE variation_id = 'fd-2' "
                 "AND metric = 'cache_mse'")["n"][0] == N  # every sample once
    assert not (store.parent / "runs" / "resume-exp" / "fd-2" / "s0" / "batches").exists()  # rows now
    assert not (store.parent / "runs" / "resume-exp" / ".reference").exists()  # spills dropped


def test_killed_run_resumes_at_its_first_unfinished_batch(uninterrupted, tmp_path, capsys):
    exp_path, whole = uninterrupted
    store = tmp_path / "killed" / "fcr.duckdb"
    cmd = [sys.executable, "-m", "fcr_eval.cli", "run", str(exp_path), "--store", str(store), "--threads", "1",
           "--device", "cpu", "--no-plots"]
    batches = store.parent / "runs" / "resume-exp" / "fd-2" / "s0" / "batches"
    logged, files = _kill_partway(cmd, batches, after=3)
    assert ResultsStore.open_readonly(store).runs()["variation_id"].to_list() == ["no-cache"]

    # a resume that does not match the plan: one line, no traceback, nothing touched
    other = tmp_path / "other.toml"
    other.write_text(EXPERIMENT.replace("num_inference_steps = 12", "num_inference_steps = 10"))
    assert main(["run", str(other), "--store", str(store), "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "fd-2 seed 0" in err and "Traceback" not in err
    assert {int(p.stem[1:]) for p in batches.glob("b*.pkl")} == files

    redone, log = _resume(cmd)
    assert f"fd-2 s0: resuming at batch {min(set(range(N // BATCH)) - files) + 1}" in log
    _check_resumed(store, logged, files, redone, 1, whole)


def test_two_processes_killed_resume_and_store_what_one_process_stores(uninterrupted, tmp_path):
    exp_path, whole = uninterrupted
    store = tmp_path / "two" / "fcr.duckdb"
    cmd = [*TORCHRUN, "-m", "fcr_eval.cli", "run", str(exp_path), "--store", str(store), "--device", "cpu",
           "--threads", "1", "--no-plots"]
    batches = store.parent / "runs" / "resume-exp" / "fd-2" / "s0" / "batches"
    logged, files = _kill_partway(cmd, batches, after=3)
    redone, _ = _resume(cmd)
    _check_resumed(store, logged, files, redone, 2, whole)
    params = ResultsStore.open_readonly(store).sql("SELECT params FROM runs")["params"].to_list()
    assert all('"processes": 2' in p.replace("'", '"') if isinstance(p, str) else p["processes"] == 2
               for p in params)
