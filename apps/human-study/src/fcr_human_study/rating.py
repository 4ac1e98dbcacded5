"""Raters, presentations and votes: the server-side state of the rating app (no Gradio here).

A *presentation* is one pair shown to one rater, with its left/right order drawn at random. The
browser receives only an opaque pair id, the two image files (random names) and a presentation
token ``<pair_id>.<presentation_id>.<HMAC>``; the variations behind a pair never leave the
server. A vote names the token and what was clicked (left, right, tie, both bad); it is accepted
once, from the rater the presentation was issued to, and is committed before the next pair is
chosen. Forged tokens (bad HMAC), replayed tokens (already used), tokens of another rater and
pair ids that are not in the study are refused with :class:`VoteRefused`; the database's unique
constraints on (rater, pair) and on the presentation back this up.

Example:
    >>> service = RatingService(StudyStore("results/human-study.duckdb", idle_close_s=1.0))
    >>> rater = service.rater_for_token(token)
    >>> p = service.current(rater)
    >>> service.vote(rater, p.token, "left")
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import random
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

import duckdb
from fcr_eval.store.csv_export import write_csv

from .build import hash_secret
from .store import StudyStore, StudyStoreError, utcnow

__all__ = ["CHOICES", "VoteRefused", "UnknownRater", "Presentation", "RatingService"]

logger = logging.getLogger(__name__)

#: What a rater can click.
CHOICES = ("left", "right", "tie", "both_bad")
_TOKEN_RE = re.compile(r"^(p[0-9a-f]{16})\.([0-9a-f]{32})\.([0-9a-f]{64})$")


class VoteRefused(ValueError):
    """A vote that is not stored; the message is safe to show to the rater."""


class UnknownRater(ValueError):
    """The invitation token is not one of this study's."""


@dataclass(frozen=True)
class Presentation:
    """What the rater's browser gets for one pair (nothing here names a variation)."""

    token: str
    pair_id: str
    prompt: str
    left_image: Path
    right_image: Path
    number: int  # 1-based position of this pair for the rater
    total: int


class RatingService:
    """The study's rating logic over a :class:`StudyStore` (its single writer in this process)."""

    def __init__(self, store: StudyStore) -> None:
        self.store = store
        rows = store.query_dicts(
            "SELECT study_id, signing_key, admin_secret_hash, n_pairs, n_attention, "
            "pairs_per_rater FROM study"
        )
        if not rows:
            raise StudyStoreError(f"{store.path} holds no study; run `fcr-human-study build` first")
        s = rows[0]
        self.study_id: str = s["study_id"]
        self._key = bytes.fromhex(s["signing_key"])
        self._admin_hash: str = s["admin_secret_hash"]
        self.n_pairs = int(s["n_pairs"])
        self.n_attention = int(s["n_attention"])
        self.per_rater = min(int(s["pairs_per_rater"]), self.n_pairs)
        self._image_files = {
            image_id: (store.root / file).resolve()
            for image_id, file in store.query("SELECT image_id, file FROM study_images")
        }

    # -- tokens -----------------------------------------------------------------------------

    def _sign(self, rater_id: str, pair_id: str, presentation_id: str) -> str:
        msg = f"{self.study_id}|{rater_id}|{pair_id}|{presentation_id}".encode()
        return hmac.new(self._key, msg, hashlib.sha256).hexdigest()

    def rater_for_token(self, token: str) -> str:
        """The rater id of an invitation token; :class:`UnknownRater` if it is not one."""
        token = (token or "").strip()
        if not token or len(token) > 200:
            raise UnknownRater("unknown invitation token")
        rows = self.store.query("SELECT rater_id FROM raters WHERE token_hash = ?", [hash_secret(token)])
        if not rows:
            raise UnknownRater("unknown invitation token")
        return rows[0][0]

    def admin_ok(self, secret: str) -> bool:
        """Whether ``secret`` is the study's admin secret (constant-time comparison)."""
        return hmac.compare_digest(hash_secret((secret or "").strip()), self._admin_hash)

    # -- presentations ----------------------------------------------------------------------

    def _attention_slots(self, rater_id: str) -> set[int]:
        """Positions (0-based) of a rater's attention checks: one in every block of 1/share."""
        if self.n_attention == 0:
            return set()
        block = max(2, round(self.n_pairs / self.n_attention))
        rng = random.Random(hmac.new(self._key, rater_id.encode(), hashlib.sha256).digest())
        return {b * block + rng.randrange(block) for b in range(-(-self.per_rater // block))}

    def progress(self, rater_id: str) -> tuple[int, int]:
        """(votes stored, pairs asked) for a rater."""
        done = self.store.query("SELECT count(*) FROM votes WHERE rater_id = ?", [rater_id])[0][0]
        return int(done), self.per_rater

    def current(self, rater_id: str) -> Presentation | None:
        """The pair the rater should rate now, or ``None`` when they are done.

        A rater has at most one open presentation: asking again (reload, reconnect, a server
        restart) returns the same pair in the same order instead of a new one. A new pair is the
        least-shown pair the rater has not rated (attention checks at the rater's slots).
        """
        with self.store.transaction() as con:
            done = con.execute("SELECT count(*) FROM votes WHERE rater_id = ?", [rater_id]).fetchone()[0]
            if done >= self.per_rater:
                return None
            row = con.execute(
                """SELECT p.presentation_id, p.pair_id, p.left_side FROM presentations p
                   WHERE p.rater_id = ? AND NOT EXISTS (
                       SELECT 1 FROM votes v WHERE v.rater_id = p.rater_id AND v.pair_id = p.pair_id)
                   ORDER BY p.issued_at DESC LIMIT 1""",
                [rater_id],
            ).fetchone()
            if row is None:
                attention = done in self._attention_slots(rater_id)
                pair_id = self._next_pair(con, rater_id, attention) or self._next_pair(
                    con, rater_id, not attention)
                if pair_id is None:
                    return None  # the rater has rated every pair of the study
                row = (secrets.token_hex(16), pair_id, secrets.choice("ab"))
                con.execute("INSERT INTO presentations VALUES (?, ?, ?, ?, ?)",
                            [row[0], rater_id, pair_id, row[2], utcnow()])
            presentation_id, pair_id, left_side = row
            prompt, image_a, image_b = con.execute(
                "SELECT prompt, image_a, image_b FROM pairs WHERE pair_id = ?", [pair_id]
            ).fetchone()
        left, right = (image_a, image_b) if left_side == "a" else (image_b, image_a)
        return Presentation(
            token=f"{pair_id}.{presentation_id}.{self._sign(rater_id, pair_id, presentation_id)}",
            pair_id=pair_id, prompt=prompt or "", left_image=self._image_files[left],
            right_image=self._image_files[right], number=int(done) + 1, total=self.per_rater,
        )

    @staticmethod
    def _next_pair(con: duckdb.DuckDBPyConnection, rater_id: str, attention: bool) -> str | None:
        # Least-shown first spreads raters evenly over the (balanced) pairs; the hash with the
        # rater id breaks ties differently for every rater.
        row = con.execute(
            """SELECT p.pair_id FROM pairs p
               LEFT JOIN (SELECT pair_id, count(*) AS n FROM presentations GROUP BY pair_id) s
                 USING (pair_id)
               WHERE p.is_attention = ?
                 AND p.pair_id NOT IN (SELECT pair_id FROM presentations WHERE rater_id = ?)
               ORDER BY coalesce(s.n, 0), hash(p.pair_id || ?) LIMIT 1""",
            [attention, rater_id, rater_id],
        ).fetchone()
        return row[0] if row else None

    # -- votes ------------------------------------------------------------------------------

    def vote(self, rater_id: str, token: str, clicked: str) -> None:
        """Store a vote durably, or raise :class:`VoteRefused` and store nothing.

        Args:
            rater_id: the rater of the session (from their invitation token).
            token: the presentation token the browser got with the pair.
            clicked: one of :data:`CHOICES`.
        """
        if clicked not in CHOICES:
            raise VoteRefused(f"unknown choice {clicked!r}")
        m = _TOKEN_RE.match((token or "").strip())
        if m is None:
            raise VoteRefused("malformed presentation token")
        pair_id, presentation_id, sig = m.groups()
        with self.store.transaction() as con:
            if con.execute("SELECT count(*) FROM pairs WHERE pair_id = ?", [pair_id]).fetchone()[0] == 0:
                raise VoteRefused("unknown pair: not in this study")
            if not hmac.compare_digest(sig, self._sign(rater_id, pair_id, presentation_id)):
                raise VoteRefused("forged or foreign presentation token: signature does not match")
            row = con.execute(
                "SELECT left_side FROM presentations WHERE presentation_id = ? AND rater_id = ? AND pair_id = ?",
                [presentation_id, rater_id, pair_id],
            ).fetchone()
            if row is None:
                raise VoteRefused("this pair was not shown to you")
            if con.execute("SELECT count(*) FROM votes WHERE presentation_id = ?",
                           [presentation_id]).fetchone()[0]:
                raise VoteRefused("this vote was already recorded (replayed request)")
            if con.execute("SELECT count(*) FROM votes WHERE rater_id = ? AND pair_id = ?",
                           [rater_id, pair_id]).fetchone()[0]:
                raise VoteRefused("you have already rated this pair")
            left_side = row[0]
            right_side = "b" if left_side == "a" else "a"
            choice = {"left": left_side, "right": right_side}.get(clicked, clicked)
            try:
                con.execute("INSERT INTO votes VALUES (?, ?, ?, ?, ?, ?, ?)",
                            [rater_id, pair_id, presentation_id, choice, clicked, left_side, utcnow()])
            except duckdb.ConstraintException as e:  # the schema's backstop
                raise VoteRefused("this vote was already recorded") from e

    # -- admin ------------------------------------------------------------------------------

    def admin_progress(self) -> dict:
        """Progress of the study for the admin view (variation names included: admin only)."""
        q = self.store.query_dicts
        totals = q(
            """SELECT (SELECT count(*) FROM votes) AS votes,
                      (SELECT count(*) FROM raters) AS raters_invited,
                      (SELECT count(DISTINCT rater_id) FROM votes) AS raters_active,
                      (SELECT count(*) FROM pairs) AS pairs,
                      (SELECT count(DISTINCT pair_id) FROM votes) AS pairs_rated"""
        )[0]
        raters = q(
            """SELECT r.label, r.rater_id, count(v.pair_id) AS votes,
                      count(*) FILTER (WHERE p.is_attention) AS attention_answered,
                      count(*) FILTER (WHERE p.is_attention AND v.choice = p.expected) AS attention_correct,
                      max(v.voted_at) AS last_vote
               FROM raters r LEFT JOIN votes v USING (rater_id) LEFT JOIN pairs p USING (pair_id)
               GROUP BY ALL ORDER BY r.label"""
        )
        vpairs = q(
            """SELECT least(p.variation_a, p.variation_b) AS variation_1,
                      greatest(p.variation_a, p.variation_b) AS variation_2,
                      count(DISTINCT p.pair_id) AS pairs, count(v.pair_id) AS votes
               FROM pairs p LEFT JOIN votes v USING (pair_id) WHERE NOT p.is_attention
               GROUP BY ALL ORDER BY 1, 2"""
        )
        return {"totals": totals, "raters": raters, "variation_pairs": vpairs}

    def export_votes_csv(self, path: str | os.PathLike) -> Path:
        """Every vote with its pair (variations, prompt, seed, attention answer) as CSV; a text cell
        a spreadsheet would run as a formula (``=...``) gets a leading ``'``."""
        rows = self.store.query_dicts(
            """SELECT v.rater_id, r.label AS rater_label, v.pair_id, p.prompt_id, p.prompt, p.seed,
                      p.variation_a, p.variation_b, p.is_attention, p.expected, v.choice,
                      CASE v.choice WHEN 'a' THEN p.variation_a WHEN 'b' THEN p.variation_b END AS winner,
                      v.clicked, v.left_side, v.voted_at
               FROM votes v JOIN pairs p USING (pair_id) JOIN raters r USING (rater_id)
               ORDER BY v.voted_at, v.rater_id"""
        )
        cols = ["rater_id", "rater_label", "pair_id", "prompt_id", "prompt", "seed", "variation_a",
                "variation_b", "is_attention", "expected", "choice", "winner", "clicked",
                "left_side", "voted_at"]
        return write_csv(path, rows, cols)  # text cells that would be formulas get a leading '

    def summary_json(self) -> str:
        return json.dumps(self.admin_progress(), default=str, indent=1)
