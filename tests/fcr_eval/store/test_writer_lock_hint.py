"""A refused second runner is told how *fcr-eval* waits (``--wait SECONDS``), never a spelling
that no command has (``wait=seconds``); fcr-train's own lock, which has no wait flag, offers none."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import fcr_common.locking as locking
import pytest
from fcr_common.locking import LockHeldError, ProcessLock
from fcr_eval.store.results import writer_lock, writer_lock_path

HOLD = textwrap.dedent(f"""
    import importlib.util, sys, time
    spec = importlib.util.spec_from_file_location("locking", {locking.__file__!r})
    locking = sys.modules["locking"] = importlib.util.module_from_spec(spec); spec.loader.exec_module(locking)
    lock = locking.ProcessLock(sys.argv[1], what="holder").acquire()
    print("held", flush=True)
    time.sleep(30)
""")


@pytest.fixture
def held(tmp_path):
    store = tmp_path / "fcr.duckdb"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(writer_lock_path(store))], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "held"
    yield store
    proc.kill()
    proc.wait()


def test_store_refusal_names_the_wait_flag(held):
    with pytest.raises(LockHeldError) as info:
        writer_lock(held, wait=False)
    msg = str(info.value)
    assert "--wait SECONDS" in msg and "wait=seconds" not in msg


def test_a_lock_without_a_wait_flag_offers_none(held):
    with pytest.raises(LockHeldError) as info:
        ProcessLock(writer_lock_path(held), what="training output folder").acquire(wait=False)
    assert "wait=" not in str(info.value) and "--wait" not in str(info.value)
