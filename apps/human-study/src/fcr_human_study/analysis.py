"""Analysis of the votes: win rates with Wilson CIs and exact binomial tests, Bradley–Terry scores
with bootstrap CIs, inter-rater agreement, attention-check exclusion.

The statistics are pure functions over plain arrays; :func:`analyse_study` reads the votes from
the study file, :func:`write_analysis` writes ``human_study_results``, ``human_study_scores`` and
``human_study_summary`` into it in one transaction (replacing the study's earlier rows).

Conventions:
- A vote's ``choice`` is ``'a'``, ``'b'``, ``'tie'`` or ``'both_bad'`` relative to the pair.
  Per variation pair, ``variation_a`` is the alphabetically first name; ``win_rate_a`` is
  ``n_a / (n_a + n_b)``: ties and "both bad" are reported but left out of the rate, the CI and
  the test.
- ``bt_score`` is the log Bradley–Terry strength, centred to mean 0 over the variations, so
  ``P(i beats j) = 1 / (1 + exp(bt_j − bt_i))``.
- Raters whose attention-check accuracy is below ``min_attention_accuracy`` are excluded from
  everything; raters who answered no attention check are kept (and counted in the summary).

Example:
    >>> result = analyse_study(StudyStore("results/human-study.duckdb"))
    >>> write_analysis(store, result); print(format_table(result))
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import stats

from . import __version__
from .store import StudyStore, StudyStoreError, utcnow

__all__ = [
    "WinRate",
    "StudyAnalysis",
    "wilson_interval",
    "win_rates",
    "bradley_terry",
    "bradley_terry_bootstrap",
    "krippendorff_alpha_nominal",
    "fleiss_kappa",
    "analyse_votes",
    "analyse_study",
    "write_analysis",
    "format_table",
]

logger = logging.getLogger(__name__)


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion ``k / n``.

    (Wilson 1927; see Brown, Cai & DasGupta 2001, https://doi.org/10.1214/ss/1009213286.)
    Returns ``(nan, nan)`` for ``n == 0``.

    Example:
        >>> [round(x, 4) for x in wilson_interval(8, 10)]
        [0.4902, 0.9433]
    """
    if n <= 0:
        return math.nan, math.nan
    z = stats.norm.ppf(0.5 + confidence / 2)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class WinRate:
    """One row of ``human_study_results`` (``variation_a`` < ``variation_b``)."""

    variation_a: str
    variation_b: str
    n_a: int
    n_b: int
    n_tie: int
    n_both_bad: int
    win_rate_a: float
    ci_low: float
    ci_high: float
    p_value: float


def win_rates(votes: Sequence[tuple[str, str, str]], confidence: float = 0.95) -> list[WinRate]:
    """Win rate of ``variation_a`` per variation pair, Wilson CI and two-sided exact binomial test.

    Args:
        votes: ``(variation_a, variation_b, choice)`` with ``choice`` in a / b / tie / both_bad.

    Example:
        >>> win_rates([("x", "y", "a")] * 8 + [("x", "y", "b")] * 2)[0].p_value
        0.109375
    """
    counts: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: dict.fromkeys(("a", "b", "tie", "both_bad"), 0))
    for va, vb, choice in votes:
        if va <= vb:
            key, c = (va, vb), choice
        else:
            key, c = (vb, va), {"a": "b", "b": "a"}.get(choice, choice)
        counts[key][c] += 1
    out = []
    for (va, vb), c in sorted(counts.items()):
        n = c["a"] + c["b"]
        lo, hi = wilson_interval(c["a"], n, confidence)
        p = stats.binomtest(c["a"], n, 0.5, alternative="two-sided").pvalue if n else math.nan
        out.append(WinRate(va, vb, c["a"], c["b"], c["tie"], c["both_bad"],
                           c["a"] / n if n else math.nan, lo, hi, float(p)))
    return out


def bradley_terry(wins: np.ndarray, *, max_iter: int = 10_000, tol: float = 1e-12) -> np.ndarray:
    """Bradley–Terry strengths by Hunter's MM algorithm.

    (Hunter 2004, "MM algorithms for generalized Bradley–Terry models",
    https://doi.org/10.1214/aos/1079120141.) ``wins[i, j]`` is how often ``i`` beat ``j``. The
    update ``p_i ← W_i / Σ_j n_ij / (p_i + p_j)`` increases the likelihood at every step.

    Returns:
        Strengths ``p`` normalised to sum 1 (``P(i beats j) = p_i / (p_i + p_j)``). A variation
        that never won gets strength 0.

    Example:
        >>> bradley_terry(np.array([[0, 3], [1, 0]])).round(3)
        array([0.75, 0.25])
    """
    w = np.asarray(wins, dtype=float)
    m = w.shape[0]
    n = w + w.T
    total_wins = w.sum(axis=1)
    p = np.full(m, 1.0 / m)
    for _ in range(max_iter):
        denom = (n / (p[:, None] + p[None, :] + 1e-300)).sum(axis=1)
        new = np.where(denom > 0, total_wins / np.where(denom > 0, denom, 1.0), p)
        new /= new.sum()
        if np.max(np.abs(new - p)) < tol:
            p = new
            break
        p = new
    return p


def _log_scores(p: np.ndarray) -> np.ndarray:
    logp = np.log(np.maximum(p, 1e-12))
    return logp - logp.mean()


def bradley_terry_bootstrap(winners: np.ndarray, losers: np.ndarray, m: int, *,
                            n_bootstrap: int = 1000, confidence: float = 0.95, seed: int = 0
                            ) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap CIs of the centred log BT scores, resampling the comparisons.

    Returns ``(low, high)`` arrays of length ``m``.
    """
    rng = np.random.default_rng(seed)
    k = len(winners)
    draws = np.empty((n_bootstrap, m))
    for b in range(n_bootstrap):
        idx = rng.integers(0, k, size=k)
        w = np.zeros((m, m))
        np.add.at(w, (winners[idx], losers[idx]), 1.0)
        draws[b] = _log_scores(bradley_terry(w, max_iter=2000, tol=1e-9))
    alpha = (1 - confidence) / 2
    return np.quantile(draws, alpha, axis=0), np.quantile(draws, 1 - alpha, axis=0)


def krippendorff_alpha_nominal(units: Sequence[Sequence[Hashable]]) -> float:
    """Krippendorff's α for nominal data; units may have any number of ratings (missing data).

    (Krippendorff, "Computing Krippendorff's alpha-reliability", 2011.) Units with fewer than two
    ratings are not pairable and are ignored. Returns ``nan`` when nothing is pairable or only one
    category occurs.
    """
    cats = sorted({v for u in units for v in u}, key=str)
    index = {c: i for i, c in enumerate(cats)}
    o = np.zeros((len(cats), len(cats)))
    for u in units:
        mu = len(u)
        if mu < 2:
            continue
        c = np.bincount([index[v] for v in u], minlength=len(cats)).astype(float)
        o += (np.outer(c, c) - np.diag(c)) / (mu - 1)
    n_c = o.sum(axis=1)
    n = n_c.sum()
    if n <= 1:
        return math.nan
    d_o = o.sum() - np.trace(o)
    d_e = (n_c.sum() ** 2 - (n_c ** 2).sum()) / (n - 1)
    if d_e == 0:
        return math.nan
    return float(1 - d_o / d_e)


def fleiss_kappa(counts: np.ndarray) -> float:
    """Fleiss' κ from an items × categories matrix of rating counts.

    (Fleiss 1971.) Items may have different numbers of raters (each needs at least two; others
    are dropped); with equal numbers this is Fleiss' original statistic.
    """
    c = np.asarray(counts, dtype=float)
    n_i = c.sum(axis=1)
    c, n_i = c[n_i >= 2], n_i[n_i >= 2]
    if len(c) == 0:
        return math.nan
    p_i = ((c ** 2).sum(axis=1) - n_i) / (n_i * (n_i - 1))
    p_j = c.sum(axis=0) / n_i.sum()
    p_e = float((p_j ** 2).sum())
    if p_e == 1.0:
        return math.nan
    return float((p_i.mean() - p_e) / (1 - p_e))


@dataclass
class StudyAnalysis:
    study_id: str
    win_rates: list[WinRate]
    variations: list[str]
    bt_scores: list[float]
    bt_ci_low: list[float]
    bt_ci_high: list[float]
    krippendorff_alpha: float
    fleiss_kappa: float
    n_items_agreement: int
    n_votes: int
    n_votes_used: int
    n_raters: int
    excluded_raters: dict[str, tuple[int, int]]
    min_attention_accuracy: float
    n_bootstrap: int
    details: dict = field(default_factory=dict)


_CATEGORIES = ("a", "b", "tie", "both_bad")


def analyse_votes(votes: Sequence[dict], *, study_id: str = "", min_attention_accuracy: float = 0.8,
                  n_bootstrap: int = 1000, confidence: float = 0.95, seed: int = 0) -> StudyAnalysis:
    """Analyse votes given as dicts with ``rater_id, pair_id, variation_a, variation_b,
    is_attention, expected, choice``."""
    attention: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # rater -> [correct, answered]
    raters = {v["rater_id"] for v in votes}
    for v in votes:
        if v["is_attention"]:
            attention[v["rater_id"]][1] += 1
            attention[v["rater_id"]][0] += int(v["choice"] == v["expected"])
    excluded = {r: (c, n) for r, (c, n) in attention.items() if n and c / n < min_attention_accuracy}
    used = [v for v in votes if not v["is_attention"] and v["rater_id"] not in excluded]

    rates = win_rates([(v["variation_a"], v["variation_b"], v["choice"]) for v in used], confidence)
    variations = sorted({v["variation_a"] for v in used} | {v["variation_b"] for v in used})
    idx = {name: i for i, name in enumerate(variations)}
    winners, losers = [], []
    for v in used:
        if v["choice"] in ("a", "b"):
            win, lose = (v["variation_a"], v["variation_b"])[:: 1 if v["choice"] == "a" else -1]
            winners.append(idx[win])
            losers.append(idx[lose])
    m = len(variations)
    if winners:
        w = np.zeros((m, m))
        np.add.at(w, (np.array(winners), np.array(losers)), 1.0)
        scores = _log_scores(bradley_terry(w))
        lo, hi = bradley_terry_bootstrap(np.array(winners), np.array(losers), m,
                                         n_bootstrap=n_bootstrap, confidence=confidence, seed=seed)
    else:
        scores = lo = hi = np.full(m, math.nan)

    by_pair: dict[str, list[str]] = defaultdict(list)
    for v in used:
        by_pair[v["pair_id"]].append(v["choice"])
    units = [u for u in by_pair.values() if len(u) >= 2]
    counts = np.array([[u.count(c) for c in _CATEGORIES] for u in units]) if units else np.zeros((0, 4))
    return StudyAnalysis(
        study_id=study_id, win_rates=rates, variations=variations, bt_scores=list(map(float, scores)),
        bt_ci_low=list(map(float, lo)), bt_ci_high=list(map(float, hi)),
        krippendorff_alpha=krippendorff_alpha_nominal(units), fleiss_kappa=fleiss_kappa(counts),
        n_items_agreement=len(units), n_votes=len(votes), n_votes_used=len(used),
        n_raters=len(raters), excluded_raters=excluded, min_attention_accuracy=min_attention_accuracy,
        n_bootstrap=n_bootstrap,
        details={
            "raters_without_attention_checks": sorted(raters - set(attention)),
            "attention": {r: {"correct": c, "answered": n} for r, (c, n) in sorted(attention.items())},
            "bt": "log strength (MM, Hunter 2004) centred to mean 0; ties and both-bad excluded; "
                  f"CI: {confidence:.0%} percentile bootstrap over comparisons, seed {seed}",
            "agreement": "over non-attention pairs with >= 2 votes; categories a/b/tie/both_bad",
            "confidence": confidence,
        },
    )


def analyse_study(store: StudyStore, **kwargs) -> StudyAnalysis:
    """Read the study's votes and analyse them (see :func:`analyse_votes` for the options)."""
    study = store.query("SELECT study_id FROM study")
    if not study:
        raise StudyStoreError(f"{store.path} holds no study; run `fcr-human-study build` first")
    votes = store.query_dicts(
        """SELECT v.rater_id, v.pair_id, p.variation_a, p.variation_b, p.is_attention, p.expected,
                  v.choice FROM votes v JOIN pairs p USING (pair_id) ORDER BY v.voted_at"""
    )
    return analyse_votes(votes, study_id=study[0][0], **kwargs)


def _db(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def write_analysis(store: StudyStore, a: StudyAnalysis) -> None:
    """Write the analysis into the study file in one transaction, replacing earlier rows."""
    now = utcnow()
    with store.transaction() as con:
        for table in ("human_study_results", "human_study_scores", "human_study_summary"):
            con.execute(f"DELETE FROM {table} WHERE study_id = ?", [a.study_id])
        for r in a.win_rates:
            con.execute(
                "INSERT INTO human_study_results VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [a.study_id, r.variation_a, r.variation_b, r.n_a, r.n_b, r.n_tie, r.n_both_bad,
                 _db(r.win_rate_a), _db(r.ci_low), _db(r.ci_high), _db(r.p_value), now],
            )
        for name, s, lo, hi in zip(a.variations, a.bt_scores, a.bt_ci_low, a.bt_ci_high, strict=True):
            con.execute("INSERT INTO human_study_scores VALUES (?, ?, ?, ?, ?)",
                        [a.study_id, name, _db(s), _db(lo), _db(hi)])
        details = dict(a.details, excluded_raters={r: {"correct": c, "answered": n}
                                                   for r, (c, n) in a.excluded_raters.items()})
        con.execute(
            "INSERT INTO human_study_summary VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [a.study_id, a.n_votes, a.n_votes_used, a.n_raters, len(a.excluded_raters),
             _db(a.krippendorff_alpha), _db(a.fleiss_kappa), a.n_items_agreement,
             a.min_attention_accuracy, a.n_bootstrap, json.dumps(details, default=str),
             f"fcr-human-study {__version__}", now],
        )


def format_table(a: StudyAnalysis) -> str:
    """A plain-text summary table of the analysis."""
    def f(x: float, fmt: str = ".3f") -> str:
        return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)

    lines = [f"study {a.study_id}: {a.n_votes_used} of {a.n_votes} votes used, {a.n_raters} raters, "
             f"{len(a.excluded_raters)} excluded (attention accuracy < {a.min_attention_accuracy:.0%})",
             "",
             f"{'variation A':<28} {'variation B':<28} {'A':>5} {'B':>5} {'tie':>5} {'bad':>5} "
             f"{'win A':>6} {'95% CI':>15} {'p':>9}"]
    for r in a.win_rates:
        lines.append(f"{r.variation_a:<28} {r.variation_b:<28} {r.n_a:>5} {r.n_b:>5} {r.n_tie:>5} "
                     f"{r.n_both_bad:>5} {f(r.win_rate_a):>6} "
                     f"{'[' + f(r.ci_low) + ', ' + f(r.ci_high) + ']':>15} {f(r.p_value, '.3g'):>9}")
    lines += ["", f"{'variation':<28} {'BT score':>9} {'95% CI':>18}"]
    for name, s, lo, hi in sorted(zip(a.variations, a.bt_scores, a.bt_ci_low, a.bt_ci_high, strict=True),
                                  key=lambda t: -t[1] if not math.isnan(t[1]) else 0):
        lines.append(f"{name:<28} {f(s, '+.3f'):>9} {'[' + f(lo, '+.2f') + ', ' + f(hi, '+.2f') + ']':>18}")
    lines += ["", f"agreement: Krippendorff's alpha (nominal) = {f(a.krippendorff_alpha)}, "
                  f"Fleiss' kappa = {f(a.fleiss_kappa)} over {a.n_items_agreement} pairs rated "
                  "by two or more raters"]
    return "\n".join(lines)
