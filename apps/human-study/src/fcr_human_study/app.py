"""The rater app (Gradio): invitation token → instructions → one pair at a time → thanks.

Everything a browser receives is built from a :class:`~fcr_human_study.rating.Presentation`:
the prompt, two images from the study's own image folder (random names), an opaque pair id
inside a signed presentation token, and the rater's progress. The rater's id lives in server-side
session state (``gr.State`` is never sent to the browser). The images go out as pixels (Gradio
caches them under content-hash names in the server's private temp folder), so no payload carries
the study folder's path on the server; Gradio's file routes reach the study's image folder only
(``allowed_paths`` and its static paths are set to it).

An invitation link may carry the token (``http://host:port/?token=...``); the page then starts
at the first pair. The admin view (progress, CSV export, analysis) is an accordion at the bottom of the page; each of
its calls checks the admin secret made by ``fcr-human-study build``.

Example:
    >>> service = RatingService(StudyStore("results/human-study.duckdb", idle_close_s=1.0))
    >>> demo = build_app(service)
    >>> launch_app(demo, service, server_name="127.0.0.1", server_port=7860)
"""

from __future__ import annotations

import functools
import html
import logging
import re
import secrets
import tempfile
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image
from starlette.middleware import Middleware

from .guard import MAX_BODY_BYTES, RequestLimits
from .rating import CHOICES, Presentation, RatingService, UnknownRater, VoteRefused
from .store import StudyStoreError

__all__ = ["INSTRUCTIONS", "CSS", "build_app", "code_block", "launch_app", "markdown_text", "progress_markdown"]

logger = logging.getLogger(__name__)

INSTRUCTIONS = """
### How it works
You will see **two images made from the same text prompt**. Please pick the one that is the
better picture *for that prompt*: the more faithful to the text, the cleaner and the more
natural-looking.

- **A is better** / **B is better** — one image is clearly or slightly better.
- **About the same** — you honestly cannot choose.
- **Both are bad** — neither image is acceptable (broken, unrecognisable, wrong subject).

Take a few seconds per pair; there are no right answers, except for a few obvious checks that
make sure everyone is paying attention. Your vote is saved as soon as you click, so you can stop
and come back later with the same invitation token.
"""

CSS = """
.gradio-container {max-width: 1080px !important; margin: auto;}
#pair-row {gap: 24px;}
#pair-row img {image-rendering: pixelated; object-fit: contain;}
#prompt-box {text-align: center; padding: 4px 0 2px 0;}
#prompt-box .ask {font-size: 0.95rem; opacity: 0.75;}
#prompt-box .prompt-text {font-size: 1.5rem; font-weight: 600; margin-top: 2px;}
#progress-wrap {display: flex; align-items: center; gap: 12px; font-size: 0.95rem;}
#progress-wrap progress {flex: 1; height: 12px; accent-color: #3b82f6;}
.choice button {font-size: 1.05rem; min-height: 52px;}
#status {min-height: 1.5em; text-align: center;}
"""

_LABELS = {"left": "⬅ A is better", "right": "B is better ➡", "tie": "About the same",
           "both_bad": "Both are bad"}


def _progress_html(done: int, total: int) -> str:
    return (f'<div id="progress-wrap"><span>Pair <b>{min(done + 1, total)}</b> of <b>{total}</b>'
            f'</span><progress value="{done}" max="{total}"></progress>'
            f'<span>{done} done</span></div>')


def _prompt_html(prompt: str) -> str:
    return ('<div id="prompt-box"><div class="ask">Which image is the better picture of</div>'
            f'<div class="prompt-text">“{html.escape(prompt)}”</div></div>')


def _screen(service: RatingService, rater_id: str | None, status: str = "") -> tuple:
    """Outputs of start/vote: (rater, login, rating, done, progress, prompt, left, right, token, status)."""
    hidden, shown = gr.update(visible=False), gr.update(visible=True)
    if rater_id is None:
        return (None, shown, hidden, hidden, "", "", None, None, "", status)
    p: Presentation | None = service.current(rater_id)
    if p is None:
        done, total = service.progress(rater_id)
        return (rater_id, hidden, hidden, shown, _progress_html(done, total), "", None, None, "",
                status)
    return (rater_id, hidden, shown, hidden, _progress_html(p.number - 1, p.total),
            _prompt_html(p.prompt), _pixels(p.left_image), _pixels(p.right_image), p.token, status)


def _pixels(path: Path) -> Image.Image:
    """The image itself, not its path: a file path would reach the browser in the payload."""
    with Image.open(path) as im:
        return im.convert("RGB")


def build_app(service: RatingService, *, title: str = "Image preference study",
              export_dir: str | Path | None = None) -> gr.Blocks:
    """The Gradio Blocks of the study (launch it with :func:`launch_app`).

    Args:
        service: the study's rating logic.
        title: the page title.
        export_dir: where the admin's CSV exports are written (one fresh folder each); the
            system's temp folder if ``None``. ``fcr-human-study serve`` passes its private temp
            folder, removed when the server stops.
    """

    def busy(status: str) -> tuple:
        # Nothing changes on screen (the same pair stays, with its token), only the status.
        return (*(gr.update() for _ in range(9)), status)

    def start(token: str):
        try:
            rater_id = service.rater_for_token(token)
            return _screen(service, rater_id)
        except UnknownRater:
            return _screen(service, None, "⚠️ Unknown invitation token. Please check it and try again.")
        except StudyStoreError as e:
            logger.error("start failed: %s", e)
            return busy("⚠️ The study server is busy. Please try again in a moment.")

    def start_from_link(request: gr.Request):
        # Invitation links may carry the token (``/?token=...``): start straight away.
        token = request.query_params.get("token", "") if request else ""
        if not token:
            return (None, gr.update(), gr.update(), gr.update(), gr.update(), gr.update(),
                    gr.update(), gr.update(), gr.update(), gr.update())
        return start(token)

    def vote(clicked: str, rater_id: str | None, token: str):
        if rater_id is None:
            return _screen(service, None, "Your session has ended (the server may have restarted). "
                                          "Enter your invitation token again to continue.")
        try:
            service.vote(rater_id, token, clicked)
        except VoteRefused as e:
            logger.warning("vote refused for %s: %s", rater_id, e)
            return _screen(service, rater_id, f"⚠️ Vote not recorded: {e}.")
        except StudyStoreError as e:  # e.g. another process held the file too long
            logger.error("vote of %s not stored: %s", rater_id, e)
            return busy("⚠️ The server is busy and did not record this vote. Please click again.")
        try:
            return _screen(service, rater_id, "✓ Saved.")
        except StudyStoreError as e:
            logger.error("next pair for %s: %s", rater_id, e)
            return busy("✓ Saved. The server is busy: reload the page to continue.")

    def admin_guard(secret: str, what: str) -> None:
        if not service.admin_ok(secret):
            logger.warning("admin %s refused: wrong admin secret", what)  # one line, no traceback
            raise gr.Error("Wrong admin secret.", print_exception=False)

    def admin_progress(secret: str) -> str:
        admin_guard(secret, "progress")
        return progress_markdown(service.admin_progress())

    def admin_export(secret: str) -> str:
        admin_guard(secret, "export")
        # A fresh folder per export (a random name: one admin's file is never another's), inside
        # the server's private temp folder, which goes when the server stops.
        if export_dir is not None:
            Path(export_dir).mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=f"votes-{secrets.token_hex(8)}-", dir=export_dir))
        return str(service.export_votes_csv(folder / f"{service.study_id}-votes.csv"))

    def admin_analyse(secret: str) -> str:
        admin_guard(secret, "analysis")
        from .analysis import analyse_study, format_table, write_analysis

        result = analyse_study(service.store, n_bootstrap=500)
        write_analysis(service.store, result)
        return code_block(format_table(result))

    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        rater = gr.State(None)
        gr.Markdown(f"# {title}")
        with gr.Column(visible=True) as login:
            gr.Markdown(INSTRUCTIONS)
            with gr.Row(equal_height=True):
                token_box = gr.Textbox(label="Invitation token", type="password", scale=4,
                                       placeholder="paste the token from your invitation")
                start_btn = gr.Button("Start", variant="primary", scale=1)
            login_msg = gr.Markdown()
        with gr.Column(visible=False) as rating:
            progress = gr.HTML()
            prompt = gr.HTML()
            with gr.Row(elem_id="pair-row", equal_height=True):
                left = gr.Image(label="A", type="pil", format="png", interactive=False, height=420,
                                buttons=[], show_label=True)
                right = gr.Image(label="B", type="pil", format="png", interactive=False, height=420,
                                 buttons=[], show_label=True)
            with gr.Row():
                buttons = {c: gr.Button(_LABELS[c], elem_classes="choice",
                                        variant="primary" if c in ("left", "right") else "secondary")
                           for c in CHOICES}
            status = gr.Markdown(elem_id="status")
            with gr.Accordion("Instructions", open=False):
                gr.Markdown(INSTRUCTIONS)
            presentation = gr.Textbox(visible=False)
        with gr.Column(visible=False) as done:
            gr.Markdown("## Thank you!\nYou have rated every pair we had for you. You can close "
                        "this page.")
        with gr.Accordion("Study admin", open=False):
            admin_secret = gr.Textbox(label="Admin secret", type="password")
            with gr.Row():
                show_btn = gr.Button("Show progress")
                export_btn = gr.Button("Export votes (CSV)")
                analyse_btn = gr.Button("Run analysis")
            admin_out = gr.Markdown()
            export_file = gr.File(label="votes.csv", interactive=False)

        outputs = [rater, login, rating, done, progress, prompt, left, right, presentation]
        start_btn.click(start, [token_box], [*outputs, login_msg], api_name="start",
                        concurrency_limit=None)
        demo.load(start_from_link, None, [*outputs, login_msg], api_visibility="private")
        token_box.submit(start, [token_box], [*outputs, login_msg], api_visibility="private",
                         concurrency_limit=None)
        for clicked, btn in buttons.items():
            btn.click(functools.partial(vote, clicked), [rater, presentation], [*outputs, status],
                      api_name=f"vote_{clicked}", concurrency_limit=None)
        show_btn.click(admin_progress, [admin_secret], [admin_out], api_name="admin_progress")
        export_btn.click(admin_export, [admin_secret], [export_file], api_name="admin_export")
        analyse_btn.click(admin_analyse, [admin_secret], [admin_out], api_name="admin_analyse")
    return demo


#: Markdown's punctuation that could start a link, an emphasis, code or a table cell.
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|~])")


def markdown_text(value: object) -> str:
    """``value`` as literal text inside Markdown: HTML escaped, Markdown punctuation backslashed,
    line breaks as spaces. Rater labels and variation ids come from whoever invited the raters or
    wrote the experiment; in the admin view they are data, never markup."""
    text = " ".join(str(value).split())
    # Backslashes first, then entities (quote=False: no '&#x27;', whose '#' would be backslashed).
    return html.escape(_MARKDOWN_SPECIAL.sub(r"\\\1", text), quote=False)


def code_block(text: str) -> str:
    """``text`` as a Markdown code block whose fence no line of it can close (variation names in
    an analysis table are data)."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}\n{text}\n{fence}"


def progress_markdown(p: dict[str, Any]) -> str:
    t = p["totals"]
    e = markdown_text
    lines = [f"**{t['votes']} votes** from {t['raters_active']} of {t['raters_invited']} invited "
             f"raters; {t['pairs_rated']} of {t['pairs']} pairs rated at least once.", "",
             "| variations | pairs | votes |", "|---|---:|---:|"]
    lines += [f"| {e(r['variation_1'])} vs {e(r['variation_2'])} | {r['pairs']} | {r['votes']} |"
              for r in p["variation_pairs"]]
    lines += ["", "| rater | id | votes | attention correct | last vote |", "|---|---|---:|---:|---|"]
    lines += [f"| {e(r['label'])} | {e(r['rater_id'])} | {r['votes']} | "
              f"{r['attention_correct']}/{r['attention_answered']} | {e(r['last_vote'] or '')} |"
              for r in p["raters"]]
    return "\n".join(lines)


def launch_app(demo: gr.Blocks, service: RatingService, *, server_name: str = "127.0.0.1",
               server_port: int | None = None, share: bool = False,
               prevent_thread_lock: bool = False, quiet: bool = False):
    """Launch ``demo`` so that only the study's image folder is reachable through Gradio's file
    routes, with no server-side rendering, uploads or analytics, and no request body over
    :data:`~fcr_human_study.guard.MAX_BODY_BYTES` on any route (:class:`~fcr_human_study.guard.RequestLimits`).

    Returns what :meth:`gradio.Blocks.launch` returns (app, local URL, share URL).
    """
    images = str(service.store.images_dir)
    # Static paths are served in place (never copied into Gradio's cache), and only these.
    gr.set_static_paths([images])
    demo.queue(default_concurrency_limit=None)
    return demo.launch(
        server_name=server_name, server_port=server_port, share=share,
        prevent_thread_lock=prevent_thread_lock, quiet=quiet, show_error=False,
        allowed_paths=[images], max_file_size="1kb", ssr_mode=False,
        app_kwargs={"middleware": [Middleware(RequestLimits, max_body_bytes=MAX_BODY_BYTES)]},
        enable_monitoring=False, mcp_server=False, css=CSS, theme=gr.themes.Soft(),
    )
