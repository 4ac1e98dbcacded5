"""ProcessLock: one holder across processes, a refusal that names it, waiting, recovery of a lock
left by ``kill -9``, and a stale-lock takeover that only one of several racers wins."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import asdict, replace
from pathlib import Path

import fcr_common.locking as locking
import pytest
from fcr_common.locking import LockHeldError, LockHolder, ProcessLock

# Subprocesses load locking.py by path: importing the fcr_train package would pull in torch.
PRELUDE = textwrap.dedent(f"""
    import importlib.util, sys, time
    spec = importlib.util.spec_from_file_location("locking", {locking.__file__!r})
    locking = sys.modules["locking"] = importlib.util.module_from_spec(spec); spec.loader.exec_module(locking)
""")

HOLD = PRELUDE + textwrap.dedent("""
    lock = locking.ProcessLock(sys.argv[1], what="the test folder", command="holder")
    lock.acquire()
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
    lock.release()
""")


def _hold(path: Path, seconds: float) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path), str(seconds)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_lock_file_names_the_holder_and_goes_with_release(tmp_path):
    path = tmp_path / "sub" / "x.lock"
    lock = ProcessLock(path, what="the test folder", command="fcr-train finetune --lam 0.1")
    assert lock.acquire() is lock and lock.held
    rec = json.loads(path.read_text())
    assert rec["pid"] == os.getpid() and rec["host"] == socket.gethostname()
    assert rec["command"] == "fcr-train finetune --lam 0.1" and rec["started_at"].endswith("+00:00")
    assert lock.holder() == LockHolder(**rec)
    lock.release()
    assert not path.exists() and not lock.held
    assert list(path.parent.iterdir()) == []  # no temporary files left behind


def test_a_second_process_is_refused_with_the_holder_named(tmp_path):
    path = tmp_path / "x.lock"
    holder = _hold(path, 30)
    try:
        t0 = time.monotonic()
        with pytest.raises(LockHeldError) as info:
            ProcessLock(path, what="the test folder").acquire(wait=False)
        assert time.monotonic() - t0 < 2  # at once
        msg = str(info.value)
        assert f"pid {holder.pid} on {socket.gethostname()}" in msg and "since 20" in msg
        assert "command: holder" in msg and "the test folder is in use" in msg and f"kill {holder.pid}" in msg
        assert info.value.holder.pid == holder.pid
        assert json.loads(path.read_text())["pid"] == holder.pid  # untouched
    finally:
        holder.kill()
        holder.wait()


def test_a_waiting_process_proceeds_once_the_holder_releases(tmp_path):
    path = tmp_path / "x.lock"
    holder = _hold(path, 1.0)
    try:
        lock = ProcessLock(path)
        with pytest.raises(LockHeldError, match="after waiting"):
            lock.acquire(wait=0.3)
        t0 = time.monotonic()
        lock.acquire(wait=30, poll_s=0.05)
        assert lock.held and time.monotonic() - t0 > 0.2
        assert json.loads(path.read_text())["pid"] == os.getpid()
        lock.release()
    finally:
        holder.wait()
    assert holder.returncode == 0


def test_a_lock_left_by_kill_9_is_taken_over(tmp_path, caplog):
    path = tmp_path / "x.lock"
    holder = _hold(path, 60)
    holder.kill()  # SIGKILL: no release, the file stays
    holder.wait()
    assert json.loads(path.read_text())["pid"] == holder.pid
    lock = ProcessLock(path, what="the test folder")
    with caplog.at_level("WARNING", logger="fcr_common.locking"):
        lock.acquire(wait=False)
    assert json.loads(path.read_text())["pid"] == os.getpid()
    assert f"took over the stale lock of pid {holder.pid}" in caplog.text
    lock.release()


RACE = PRELUDE + textwrap.dedent("""
    locking._takeover_pause_s = 0.5  # a wide window between finding the stale lock and replacing it
    path, go = sys.argv[1], sys.argv[2]
    while not __import__("os").path.exists(go):
        time.sleep(0.005)
    try:
        lock = locking.ProcessLock(path).acquire(wait=False)
        print("won", flush=True)
        time.sleep(1.5)   # hold while the others finish trying
        lock.release()
    except locking.LockHeldError as e:
        print("refused", e.holder.pid if e.holder else None, flush=True)
""")


def test_concurrent_takeover_of_a_stale_lock_has_exactly_one_winner(tmp_path):
    path, go = tmp_path / "x.lock", tmp_path / "go"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = replace(LockHolder.of_this_process("gone"), pid=int(dead.stdout), process_start=None)
    path.write_text(json.dumps(asdict(stale)))
    racers = [subprocess.Popen([sys.executable, "-c", RACE, str(path), str(go)], stdout=subprocess.PIPE, text=True)
              for _ in range(4)]
    time.sleep(0.5)  # let them all start polling
    go.touch()
    out = {p.pid: p.communicate(timeout=60)[0].split() for p in racers}
    winners = [pid for pid, words in out.items() if words == ["won"]]
    assert len(winners) == 1, out
    assert all(words == ["refused", str(winners[0])] for pid, words in out.items() if pid != winners[0]), out
    assert not path.exists()  # the winner released it


def test_staleness_rules():
    me = LockHolder.of_this_process("x")
    assert not me.is_stale()  # this very process runs
    if me.process_start is not None:  # a reused pid: alive, but another process than the holder
        assert replace(me, process_start=str(int(me.process_start) + 1)).is_stale()
    assert not replace(me, host="another-host", pid=2**22 + 12345).is_stale()  # cannot tell: not stale


def test_a_lock_from_another_host_is_not_taken_over(tmp_path):
    path = tmp_path / "x.lock"
    path.write_text(json.dumps(asdict(replace(LockHolder.of_this_process("far"), host="gpu-node-7"))))
    before = path.read_bytes()
    with pytest.raises(LockHeldError, match="another host") as info:
        ProcessLock(path).acquire()
    assert f"delete {path}" in str(info.value) and path.read_bytes() == before


def test_an_unreadable_lock_file_is_refused_not_removed(tmp_path):
    path = tmp_path / "x.lock"
    path.write_bytes(b"\x00garbage")
    with pytest.raises(LockHeldError, match="cannot be read"):
        ProcessLock(path).acquire(wait=5)  # no point waiting on a file nobody will release
    assert path.read_bytes() == b"\x00garbage"


def test_a_second_lock_object_in_the_same_process_is_refused(tmp_path):
    path = tmp_path / "x.lock"
    with ProcessLock(path) as first:
        with pytest.raises(LockHeldError, match=f"pid {os.getpid()}"):
            ProcessLock(path).acquire()
        assert first.acquire() is first  # re-acquiring by the holder is a no-op
    assert not path.exists()


def test_release_leaves_a_lock_that_was_taken_over(tmp_path, caplog):
    path = tmp_path / "x.lock"
    lock = ProcessLock(path).acquire()
    other = replace(LockHolder.of_this_process("newer"), token="f" * 16)
    path.write_text(json.dumps(asdict(other)))  # e.g. removed by hand and taken by another process
    with caplog.at_level("WARNING", logger="fcr_common.locking"):
        lock.release()
    assert json.loads(path.read_text())["token"] == "f" * 16 and "no longer names this process" in caplog.text
