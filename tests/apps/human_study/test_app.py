"""The Gradio app, launched on 127.0.0.1 and driven through gradio_client as raters would."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from fcr_human_study.analysis import analyse_study
from fcr_human_study.app import build_app, launch_app
from fcr_human_study.build import add_raters, build_study
from fcr_human_study.rating import RatingService
from fcr_human_study.store import StudyStore

from ..browser import free_port
from .conftest import VARIATIONS, make_results_store, rater_client

PER_RATER = 25

# gradio's queue uses pandas options that pandas 3 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:.*(no_silent_downcasting|copy keyword).*")


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    root = tmp_path_factory.mktemp("app")
    results = make_results_store(root)
    study = root / "results" / "human-study.duckdb"
    report = build_study(results, study, n_pairs=40, attention_share=0.1, pairs_per_rater=PER_RATER)
    tokens = [t for _, t in add_raters(study, 30)]
    service = RatingService(StudyStore(study, idle_close_s=1.0))
    demo = build_app(service)
    _, url, _ = launch_app(demo, service, server_name="127.0.0.1", server_port=free_port(),
                           prevent_thread_lock=True, quiet=True)
    yield {"url": url, "service": service, "tokens": tokens, "admin": report.admin_secret,
           "study": study, "results": results, "payloads": []}
    demo.close()
    service.store.close()


# Outputs the client sees (layout and session state are not sent as values):
# (progress, prompt, left image, right image, presentation token, status)
TOKEN, STATUS = 4, 5

# For helper processes: open (or attach read-only) the study file, retrying while the server
# still holds it, as a well-behaved reader does.
RETRY_CONNECT = """
import duckdb, sys, time
def connect(path, read_only, con=None):
    for _ in range(200):
        try:
            if con is None:
                return duckdb.connect(path, read_only=read_only)
            con.execute(f"ATTACH '{path}' AS hs (READ_ONLY)")
            return con
        except duckdb.IOException:
            time.sleep(0.05)
    raise SystemExit('study file stayed locked')
"""


def votes_of(service: RatingService, tokens: list[str]) -> list[tuple]:
    raters = [service.rater_for_token(t) for t in tokens]
    return service.store.query(
        f"SELECT rater_id, pair_id, presentation_id FROM votes WHERE rater_id IN "
        f"({', '.join('?' * len(raters))})", raters)


@pytest.mark.slow
def test_20_concurrent_raters_25_votes_each_store_exactly_500(app):
    """Slow (over a minute under load): 500 votes from 20 concurrent raters through the live server, each
    a real request that the study store acknowledges; every one must be stored exactly once."""
    tokens = app["tokens"][:20]
    errors, payloads = [], app["payloads"]

    def rater(token: str, seed: int) -> None:
        try:
            rng = random.Random(seed)
            c = rater_client(app["url"])
            out = c.predict(token, api_name="/start")
            payloads.append(out)
            for k in range(PER_RATER):
                choice = rng.choice(["left", "right", "tie", "both_bad"])
                new = c.predict(out[TOKEN], api_name=f"/vote_{choice}")
                payloads.append(new)
                assert new[STATUS].startswith("✓"), new[STATUS]
                assert (new[TOKEN] == "") == (k == PER_RATER - 1)  # done after the last one
                out = new
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=rater, args=(t, i)) for i, t in enumerate(tokens)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not errors, errors[:3]
    rows = votes_of(app["service"], tokens)
    assert len(rows) == 20 * PER_RATER
    assert len({(r, p) for r, p, _ in rows}) == 500  # no rater rated a pair twice
    assert len({pres for *_, pres in rows}) == 500
    per_rater = {}
    for r, *_ in rows:
        per_rater[r] = per_rater.get(r, 0) + 1
    assert set(per_rater.values()) == {PER_RATER}


def _assert_no_variation_names(text: str) -> None:
    for v in VARIATIONS:
        for part in (v, v.split("-")[0]):
            assert part not in text, f"{part!r} sent to the browser"
    assert "exp-human-study-test" not in text  # run ids name experiment and variation


def test_browser_payloads_contain_no_variation_names(app):
    url = app["url"]
    c = rater_client(url)
    out = c.predict(app["tokens"][20], api_name="/start")
    seen = [out]
    for choice in ("left", "right", "tie", "both_bad", "left"):
        out = c.predict(out[TOKEN], api_name=f"/vote_{choice}")
        seen.append(out)
    seen += app["payloads"]  # the concurrent raters' responses, when that test ran first
    _assert_no_variation_names(json.dumps(seen, default=str))
    with httpx.Client(base_url=url) as h:
        for path in ("", "config", "gradio_api/info", "gradio_api/info?all_endpoints=true"):
            r = h.get(path)
            assert r.status_code == 200
            _assert_no_variation_names(r.text)
        # The raw event stream of a vote, as the browser receives it.
        r = h.post("gradio_api/call/vote_tie", json={"data": [out[TOKEN]]})
        event = r.json()["event_id"]
        _assert_no_variation_names(h.get(f"gradio_api/call/vote_tie/{event}").text)
        # The image bytes themselves (no metadata naming the source).
        for o in seen[:3]:
            for img in (o[2], o[3]):
                body = h.get(img["url"]).content
                assert body[:8] == b"\x89PNG\r\n\x1a\n"
                _assert_no_variation_names(body.decode("latin-1"))


def test_forged_replayed_and_unknown_votes_are_refused(app):
    service, token = app["service"], app["tokens"][21]
    c = rater_client(app["url"])
    out = c.predict(token, api_name="/start")
    good = out[TOKEN]
    pair_id, pres_id, sig = good.split(".")
    before = len(votes_of(service, [token]))
    for bad, why in [
        (f"{pair_id}.{pres_id}.{sig[::-1]}", "forged"),
        (f"p{'0' * 16}.{pres_id}.{sig}", "unknown pair"),
        (f"{pair_id}.{'f' * 32}.{sig}", "forged"),
        ("", "malformed"),
    ]:
        res = c.predict(bad, api_name="/vote_left")
        assert "not recorded" in res[STATUS] and why in res[STATUS]
        assert res[TOKEN] == good  # the same pair is shown again
    assert len(votes_of(service, [token])) == before
    ok = c.predict(good, api_name="/vote_right")
    assert ok[STATUS].startswith("✓")
    replay = c.predict(good, api_name="/vote_left")
    assert "replayed" in replay[STATUS]
    assert len(votes_of(service, [token])) == before + 1
    # A presentation token used from another rater's session is refused too.
    other = rater_client(app["url"])
    other.predict(app["tokens"][22], api_name="/start")
    assert "not recorded" in other.predict(ok[TOKEN], api_name="/vote_left")[STATUS]
    # A session that never presented a token (e.g. after a restart) is sent back to the start.
    fresh = rater_client(app["url"])
    assert "session has ended" in fresh.predict(ok[TOKEN], api_name="/vote_left")[STATUS]
    assert len(votes_of(service, [token])) == before + 1
    assert "Unknown invitation token" in fresh.predict("guess", api_name="/start")[STATUS]


def test_only_the_study_images_are_served(app):
    url, study, results = app["url"], app["study"], app["results"]
    out = rater_client(url).predict(app["tokens"][23], api_name="/start")
    with httpx.Client(base_url=url) as h:
        assert h.get(out[2]["url"]).status_code == 200
        images = study.parent / "human-study" / "images"
        sample = next((results.parent / "samples").rglob("*.png"))
        for path in ["/etc/passwd", str(study), str(results), str(sample),
                     str(Path(__file__).resolve()), f"{images}/../../human-study.duckdb",
                     f"{images}/..%2F..%2Fhuman-study.duckdb", "https://example.com/x.png"]:
            r = h.get(f"gradio_api/file={path}")
            assert r.status_code in (403, 404), (path, r.status_code)
            assert b"SQLite" not in r.content and b"DUCK" not in r.content


def test_admin_view_needs_its_own_secret(app):
    c = rater_client(app["url"])
    out = c.predict(app["tokens"][25], api_name="/start")
    c.predict(out[TOKEN], api_name="/vote_left")
    for wrong in ("", "guess", app["tokens"][0]):
        with pytest.raises(Exception, match="Wrong admin secret"):
            c.predict(wrong, api_name="/admin_progress")
        with pytest.raises(Exception, match="Wrong admin secret"):
            c.predict(wrong, api_name="/admin_export")
    progress = c.predict(app["admin"], api_name="/admin_progress")
    assert "votes" in progress and "attention correct" in progress
    exported = c.predict(app["admin"], api_name="/admin_export")
    with httpx.Client() as h:
        csv_text = h.get(exported["url"]).text
    header, *rows = csv_text.strip().splitlines()
    assert header.startswith("rater_id,rater_label,pair_id")
    n = app["service"].store.query("SELECT count(*) FROM votes")[0][0]
    assert len(rows) >= n > 0


def test_analyse_and_readers_take_turns_with_the_running_server(app):
    """The server releases the study file when idle, so `analyse` (another process) can write
    its tables and the explorer can attach the file read-only; voting goes on afterwards."""
    c = rater_client(app["url"])
    out = c.predict(app["tokens"][24], api_name="/start")
    for _ in range(10):
        out = c.predict(out[TOKEN], api_name="/vote_left")
    time.sleep(1.5)  # idle_close_s = 1.0
    study = str(app["study"])
    res = subprocess.run([sys.executable, "-m", "fcr_human_study.cli", "analyse", "--study", study,
                          "--bootstrap", "50", "--min-attention-accuracy", "0"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "BT score" in res.stdout and "Krippendorff" in res.stdout
    time.sleep(0.2)
    reader = subprocess.run(
        [sys.executable, "-c", RETRY_CONNECT +
         "c = duckdb.connect(); connect(sys.argv[1], True, c); "
         "print(c.execute('SELECT count(*) FROM hs.human_study_results').fetchone()[0], "
         "c.execute('SELECT count(*) FROM hs.human_study_scores').fetchone()[0])", study],
        capture_output=True, text=True, timeout=120)
    assert reader.returncode == 0, reader.stderr
    expected = analyse_study(app["service"].store, n_bootstrap=10, min_attention_accuracy=0.0)
    assert reader.stdout.split() == [str(len(expected.win_rates)), str(len(expected.variations))]
    assert len(expected.win_rates) > 0
    # The server goes on storing votes after the other processes let go of the file.
    assert c.predict(out[TOKEN], api_name="/vote_right")[STATUS].startswith("✓")


def test_a_vote_blocked_by_another_process_is_not_acknowledged_and_can_be_retried(app):
    service = app["service"]
    c = rater_client(app["url"])
    out = c.predict(app["tokens"][26], api_name="/start")
    before = service.store.query("SELECT count(*) FROM votes")[0][0]
    holder = subprocess.Popen(
        [sys.executable, "-c", RETRY_CONNECT + "c = connect(sys.argv[1], False); "
         "print('held', flush=True); time.sleep(4)", str(app["study"])],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    old_timeout, service.store.lock_timeout = service.store.lock_timeout, 0.5
    try:
        res = c.predict(out[TOKEN], api_name="/vote_left")
        assert "busy" in res[STATUS] and "did not record" in res[STATUS]
    finally:
        service.store.lock_timeout = old_timeout
        holder.wait(timeout=30)
    # The same click again, once the other process is gone, is stored once.
    res = c.predict(out[TOKEN], api_name="/vote_left")
    assert res[STATUS].startswith("✓")
    assert service.store.query("SELECT count(*) FROM votes")[0][0] == before + 1


def test_image_payloads_do_not_show_the_study_folder(app):
    """The browser gets pixels (Gradio's cache names), never the study folder's server path."""
    out = rater_client(app["url"]).predict(app["tokens"][26], api_name="/start")
    folder = str(app["study"].resolve().parent)
    for img in (out[2], out[3]):
        assert folder not in str(img) and "human-study/images" not in str(img), img
    with httpx.Client(base_url=app["url"]) as h:
        assert h.get(out[2]["url"]).content[:8] == b"\x89PNG\r\n\x1a\n"
