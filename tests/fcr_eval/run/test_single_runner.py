"""One runner per store: a second ``fcr-eval run`` on a store another runner holds refuses at once,
naming the holder, or (``--wait``) waits for it and then finds nothing left to do; the first
finishes intact and no run is computed twice. (A lock left by a ``kill -9``'d runner is taken over:
``test_runner.py``'s resume fixture.)"""

from __future__ import annotations

import os
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


def test_second_runner_refuses_or_waits_and_no_work_is_done_twice(tmp_path):
    """Slow (over a minute under load): three real runner processes — the first runs the tiny experiment
    whole while a second is refused and a third waits for it and then finds nothing left to do."""
    store = tmp_path / "results" / "fcr.duckdb"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(_cli(store), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        lock = writer_lock_path(store)
        deadline = time.monotonic() + 120
        while not (lock.is_file() and str(first.pid) in lock.read_text()):
            assert first.poll() is None, first.communicate()
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

        waiter = subprocess.Popen(_cli(store, "--wait", "600"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=env)
        out1, err1 = first.communicate(timeout=600)
        assert first.returncode == 0, err1[-3000:]
        out2, err2 = waiter.communicate(timeout=600)
        assert waiter.returncode == 0, err2[-3000:]
    finally:
        for p in (first,):
            if p.poll() is None:
                p.kill()
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
