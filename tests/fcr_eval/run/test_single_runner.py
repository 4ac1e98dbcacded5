"""One runner per store: a second ``fcr-eval run`` on a store another runner holds refuses at once,
naming the holder, or (``--wait``) waits for it and then finds nothing left to do; the first
finishes intact and no run is computed twice. (A lock left by a ``kill -9``'d runner is taken over:
``test_runner.py``'s resume fixture.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fcr_eval.store import ResultsStore, writer_lock_path

# slow: two real runners on one store
pytestmark = pytest.mark.slow

TINY = Path(__file__).parents[1] / "experiments" / "tiny.toml"


def _cli(store: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "fcr_eval.cli", "run", str(TINY), "--profile", "one-seed", "--store", str(store),
            "--no-plots", "--threads", "1", *extra]


def test_second_runner_refuses_or_waits_and_no_work_is_done_twice(tmp_path, warm_runner):
    """Three real runner processes — the first runs the tiny experiment whole while a second is refused
    and a third waits for it and then finds nothing left to do. The first and third are forks of the
    ``warm_runner`` interpreter (``tests/warm.py``: ~6 s of imports each saved); the refused one starts
    fresh, to show it answers before torch is loaded."""
    store = tmp_path / "results" / "fcr.duckdb"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    first = warm_runner.start("fcr_eval.cli", _cli(store)[3:])
    try:
        lock = writer_lock_path(store)
        deadline = time.monotonic() + 120
        while not (lock.is_file() and str(first.pid) in lock.read_text()):
            assert first.poll() is None, first.stderr[-3000:]
            assert time.monotonic() < deadline, "the first runner never took the store's lock"
            time.sleep(0.2)
        runs_dir = tmp_path / "results" / "runs"

        # refused before torch is loaded: the second runner answers at once
        says_torch = ("import sys\nfrom fcr_eval.cli import main\ntry:\n    sys.exit(main(sys.argv[1:]))\n"
                      "finally:\n    print('torch loaded:', 'torch' in sys.modules)")
        refused = subprocess.run([sys.executable, "-c", says_torch, *_cli(store)[3:]], capture_output=True,
                                 text=True, env=env, timeout=120)
        assert "torch loaded: False" in refused.stdout, refused.stdout
        assert refused.returncode == 2, refused.stderr
        assert f"pid {first.pid}" in refused.stderr and "Traceback" not in refused.stderr
        assert "--wait" in refused.stderr or "wait" in refused.stderr.lower()

        waiter = warm_runner.start("fcr_eval.cli", _cli(store, "--wait", "600")[3:])
        assert first.wait(600) == 0, first.stderr[-3000:]
        assert waiter.wait(600) == 0, waiter.stderr[-3000:]
        out1, out2 = first.stdout, waiter.stdout
    finally:
        if first.poll() is None:
            os.kill(first.pid, signal.SIGKILL)
            first.wait(60)
    n_runs = out1.split(" runs, ")[0].rsplit(" ", 1)[-1]
    assert f"{n_runs} already in" in out2 and "0 to do" in out2, out2[:2000]  # waited, then nothing to redo
    s = ResultsStore.open_readonly(store)
    ids = s.runs()["run_id"].to_list()
    assert len(ids) == len(set(ids)) == int(n_runs)
    # every stored run is whole (one transaction each) and has the samples of one runner only
    assert s.sql("SELECT count(*) AS n FROM samples")["n"][0] == len(ids) * 10
    exp_dir = runs_dir / "tiny-exp"
    assert sorted(p.name for p in exp_dir.iterdir()) == sorted({"finetune", *s.runs()["variation_id"].to_list()})
    assert not writer_lock_path(store).exists()
