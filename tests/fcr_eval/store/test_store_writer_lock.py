"""One writer per results store: a second writer is refused naming the first, or waits for it;
a lock left by a killed writer is taken over."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest
from fcr_common.locking import LockHeldError
from fcr_eval.store import ResultsStore, writer_lock, writer_lock_path

HOLDER = textwrap.dedent("""
    import sys, time
    from fcr_eval.store import ResultsStore, writer_lock
    with writer_lock(sys.argv[1]):
        ResultsStore(sys.argv[1])       # what a runner does first
        print("held", flush=True)
        time.sleep(float(sys.argv[2]))
    print("released", flush=True)
""")


def _holder(path, seconds):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), str(seconds)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_then_waits_and_proceeds(tmp_path):
    store = tmp_path / "results" / "fcr.duckdb"
    holder = _holder(store, 2.0)
    try:
        with pytest.raises(LockHeldError) as info:
            writer_lock(store)
        assert f"results store {store} is in use by pid {holder.pid}" in str(info.value)
        t0 = time.monotonic()
        with writer_lock(store, wait=60) as lock:
            assert lock.held and time.monotonic() - t0 > 0.1
            assert ResultsStore(store).runs().height == 0  # the store is ours now
        assert not writer_lock_path(store).exists()
    finally:
        holder.wait(30)
    assert holder.stdout.read().split() == ["released"]


def test_a_killed_writer_leaves_a_lock_that_is_taken_over(tmp_path):
    store = tmp_path / "fcr.duckdb"
    holder = _holder(store, 120)
    holder.kill()
    holder.wait()
    assert writer_lock_path(store).exists()
    lock = writer_lock(store, wait=False)
    assert lock.held and lock.holder().pid != holder.pid
    lock.release()
