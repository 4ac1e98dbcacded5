"""A server killed with SIGKILL between (and during) votes loses no acknowledged vote."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
from fcr_human_study.build import add_raters, build_study
from fcr_human_study.store import StudyStore
from gradio_client import Client

from ...warm import WarmPython
from ..browser import free_port
from .conftest import make_results_store, rater_client
from .test_app import STATUS, TOKEN

pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:.*(no_silent_downcasting|copy keyword).*")]


@pytest.fixture(scope="module")
def warm():
    """An interpreter that has imported Gradio and the app (no thread started by that) and forks each
    server start: a real process killed with SIGKILL, without ~4 s of imports a start (``tests/warm.py``)."""
    with WarmPython("fcr_human_study.app,fcr_human_study.cli",
                    env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}) as w:
        yield w


def start_server(warm: WarmPython, study: Path, port: int):
    proc = warm.start("fcr_human_study.cli", ["serve", "--study", str(study), "--host", "127.0.0.1",
                                              "--port", str(port)])
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the server exited: {proc.stderr[-2000:]}"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/config", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    kill9(proc)
    raise TimeoutError("the server did not come up")


def kill9(proc) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def client(port: int) -> Client:
    return rater_client(f"http://127.0.0.1:{port}/")


def test_kill_and_restart_loses_no_vote(tmp_path: Path, warm):
    """Slow (over a minute under load): the study server is started, SIGKILLed between and during votes
    and started again (a Gradio start each time) — the property is about real restarts."""
    results = make_results_store(tmp_path)
    study = tmp_path / "results" / "human-study.duckdb"
    build_study(results, study, n_pairs=40, attention_share=0.1, pairs_per_rater=40)
    (_, tok_a), (_, tok_b) = add_raters(study, 2)
    port = free_port()
    acked: list[str] = []  # presentation tokens of every vote the server acknowledged

    server = start_server(warm, study, port)
    try:
        a = client(port)
        out = a.predict(tok_a, api_name="/start")
        for _ in range(5):
            new = a.predict(out[TOKEN], api_name="/vote_left")
            assert new[STATUS].startswith("✓")
            acked.append(out[TOKEN])
            out = new
        shown_before_kill = out[TOKEN]
        kill9(server)  # between votes

        server = start_server(warm, study, port)
        a = client(port)  # the old session is gone with the process: start again
        out = a.predict(tok_a, api_name="/start")
        assert "<b>6</b> of <b>40</b>" in out[0]  # 5 votes were kept
        assert out[TOKEN] == shown_before_kill  # the same pair, in the same order
        new = a.predict(out[TOKEN], api_name="/vote_right")
        assert new[STATUS].startswith("✓")
        acked.append(out[TOKEN])

        # Now kill it while a rater is voting as fast as they can.
        b = client(port)
        stop = threading.Event()

        def rater_b() -> None:
            cur = b.predict(tok_b, api_name="/start")
            while not stop.is_set():
                try:
                    nxt = b.predict(cur[TOKEN], api_name="/vote_tie")
                except Exception:  # noqa: BLE001 - the server died mid-request: not acknowledged
                    return
                if nxt[STATUS].startswith("✓"):
                    acked.append(cur[TOKEN])
                cur = nxt

        t = threading.Thread(target=rater_b)
        t.start()
        deadline = time.monotonic() + 60
        while len(acked) < 6 + 8 and time.monotonic() < deadline and t.is_alive():
            time.sleep(0.01)
        kill9(server)
        stop.set()
        t.join(timeout=60)
        assert len(acked) >= 6 + 8

        server = start_server(warm, study, port)
        b = client(port)
        out = b.predict(tok_b, api_name="/start")
        assert out[TOKEN]
        # A token that was acknowledged before the kill cannot be replayed after it.
        replay = b.predict(acked[-1], api_name="/vote_left")
        assert "replayed" in replay[STATUS]
    finally:
        if server.poll() is None:
            kill9(server)

    store = StudyStore(study, read_only=True)
    try:
        stored = {p for (p,) in store.query("SELECT presentation_id FROM votes")}
        acked_ids = {token.split(".")[1] for token in acked}
        n_pairs = store.query("SELECT count(*), count(DISTINCT (rater_id, pair_id)) FROM votes")[0]
    finally:
        store.close()
    assert acked_ids <= stored  # every acknowledged vote survived both kills
    assert len(stored) - len(acked_ids) <= 1  # at most the one in flight at the kill, unacknowledged
    assert n_pairs[0] == n_pairs[1]  # no duplicates
