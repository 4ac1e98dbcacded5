"""Resume inside a run: a runner killed (SIGKILL, a real process) partway through a run's batches
resumes at its first unfinished batch, redoes at most the one batch each process was on, writes
no batch twice, and stores the same rows as an uninterrupted run — with one process and with two
(gloo on CPU). A run folder of another configuration is refused in one line.

Every runner is a fork of the ``warm_runner`` interpreter (``tests/warm.py``: real processes, killed
with SIGKILL, without ~6 s of imports each); the two-process run's ranks get the environment torchrun
gives its workers (``test_runner_multiprocess.py`` launches torchrun itself)."""

from __future__ import annotations

import os
import re
import signal
import socket
import time
from pathlib import Path

import pytest
from fcr_eval.cli import main
from fcr_eval.store import ResultsStore

from ...warm import WarmPython  # the warm_runner fixture's (tests/conftest.py)

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


class _Ranks:
    """The two processes of a multi-process run, forked from the warm interpreter with the environment
    torchrun gives its workers (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT: accelerate's env://
    rendezvous, gloo on CPU); ``test_runner_multiprocess.py`` launches the real torchrun."""

    def __init__(self, warm: WarmPython, args: list[str]) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        shared = {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        self.children = [warm.start("fcr_eval.cli", args, env={**shared, "RANK": str(r), "LOCAL_RANK": str(r)})
                         for r in range(2)]
        self.pids = [c.pid for c in self.children]

    def stderr_lines(self):
        """Both ranks' stderr lines as they are written: whichever rank has a whole line, never waiting
        on a quiet one."""
        files = [c.err_path.open() for c in self.children]
        partial = ["", ""]
        try:
            while True:
                ended = self.poll() is not None  # before reading: what was written by then is read below
                got = False
                for r, f in enumerate(files):
                    while chunk := f.readline():
                        partial[r] += chunk
                        if partial[r].endswith("\n"):
                            got = True
                            yield partial[r]
                            partial[r] = ""
                if ended and not got:
                    yield from (p for p in partial if p)
                    return
                if not got:
                    time.sleep(0.05)
        finally:
            for f in files:
                f.close()

    def poll(self):
        codes = [c.poll() for c in self.children]
        return None if None in codes else max(codes, key=abs)

    def wait(self, timeout: float):
        return max((c.wait(timeout) for c in self.children), key=abs)

    @property
    def stderr(self) -> str:
        return "".join(c.stderr for c in self.children)


def _kill_partway(proc, batches_dir: Path, after: int, timeout: float = 400) -> tuple[set[int], set[int]]:
    """SIGKILL the started runner ``proc`` (its processes and their descendants) once its log says fd-2's batch ``after``
    finished; returns (fd-2 batches logged finished, fd-2 batch files on disk)."""
    logged: set[int] = set()
    pids = getattr(proc, "pids", None) or [proc.pid]
    deadline = time.monotonic() + timeout
    try:
        for line in proc.stderr_lines():
            m = BATCH_LINE.search(line)
            if m:
                logged.add(int(m.group(1)) - 1)
                if len(logged) >= after:
                    for pid in pids:
                        _kill_all(pid)
                    break
            assert time.monotonic() < deadline, "no fd-2 batch finished in time"
        else:
            pytest.fail(f"the runner ended before fd-2 had {after} batches (exit {proc.wait(60)})")
    finally:
        if proc.poll() is None:
            for pid in pids:
                _kill_all(pid)
        proc.wait(timeout=60)
    on_disk = {int(p.stem[1:]) for p in batches_dir.glob("b*.pkl")}
    return logged, on_disk


def _resume(proc) -> tuple[list[int], str]:
    """Let the started runner ``proc`` (a warm child or :class:`_Ranks`) run to the end; the fd-2 batches
    it logged finished (in order) and its stderr."""
    code = proc.wait(600)
    err = proc.stderr
    assert code == 0, err[-3000:]
    return [int(m.group(1)) - 1 for m in BATCH_LINE.finditer(err)], err


def _run_args(exp_path: Path, store: Path) -> list[str]:
    return ["run", str(exp_path), "--store", str(store), "--threads", "1", "--device", "cpu", "--no-plots"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, warm_runner):
    tmp = tmp_path_factory.mktemp("whole")
    exp_path = tmp / "resume.toml"
    exp_path.write_text(EXPERIMENT)
    store = tmp / "whole" / "fcr.duckdb"
    # a process like the killed ones (same BLAS threads): set-level metrics of 16 samples in 1280
    # dimensions move in the 10th digit with the BLAS's summation order
    _resume(warm_runner.start("fcr_eval.cli", _run_args(exp_path, store)))
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


def test_killed_run_resumes_at_its_first_unfinished_batch(uninterrupted, warm_runner, tmp_path, capsys):
    exp_path, whole = uninterrupted
    store = tmp_path / "killed" / "fcr.duckdb"
    args = _run_args(exp_path, store)
    batches = store.parent / "runs" / "resume-exp" / "fd-2" / "s0" / "batches"
    logged, files = _kill_partway(warm_runner.start("fcr_eval.cli", args), batches, after=3)
    assert ResultsStore.open_readonly(store).runs()["variation_id"].to_list() == ["no-cache"]

    # a resume that does not match the plan: one line, no traceback, nothing touched
    other = tmp_path / "other.toml"
    other.write_text(EXPERIMENT.replace("num_inference_steps = 12", "num_inference_steps = 10"))
    assert main(["run", str(other), "--store", str(store), "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "fd-2 seed 0" in err and "Traceback" not in err
    assert {int(p.stem[1:]) for p in batches.glob("b*.pkl")} == files

    redone, log = _resume(warm_runner.start("fcr_eval.cli", args))
    assert f"fd-2 s0: resuming at batch {min(set(range(N // BATCH)) - files) + 1}" in log
    _check_resumed(store, logged, files, redone, 1, whole)


def test_two_processes_killed_resume_and_store_what_one_process_stores(uninterrupted, warm_runner, tmp_path):
    exp_path, whole = uninterrupted
    store = tmp_path / "two" / "fcr.duckdb"
    args = _run_args(exp_path, store)
    batches = store.parent / "runs" / "resume-exp" / "fd-2" / "s0" / "batches"
    logged, files = _kill_partway(_Ranks(warm_runner, args), batches, after=3)
    redone, _ = _resume(_Ranks(warm_runner, args))
    _check_resumed(store, logged, files, redone, 2, whole)
    params = ResultsStore.open_readonly(store).sql("SELECT params FROM runs")["params"].to_list()
    assert all('"processes": 2' in p.replace("'", '"') if isinstance(p, str) else p["processes"] == 2
               for p in params)
