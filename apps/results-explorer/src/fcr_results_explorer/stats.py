"""Small statistics on already-aggregated frames (a handful of rows per variation).

The heavy lifting (count, mean, sample standard deviation over seeds) happens in SQL; these
functions only turn those into confidence intervals, fronts and fits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import polars as pl
from fcr_eval.analysis.stats import clustered_interval, pearson_r2
from scipy import stats as sps


def t_half_width(n: int | None, sd: float | None, confidence: float = 0.95) -> float | None:
    """Half-width of the two-sided t-interval for a mean of ``n`` values with sample sd ``sd``.

    ``None`` when it is undefined (fewer than two values).

    Example:
        >>> round(t_half_width(3, 1.0), 4)  # t_{0.975, 2} / sqrt(3)
        2.4841
    """
    if n is None or sd is None or n < 2 or math.isnan(sd):
        return None
    return float(sps.t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n))


def with_ci(frame: pl.DataFrame, n: str = "n", sd: str = "sd", out: str = "ci95") -> pl.DataFrame:
    """Add a column with the 95% t-interval half-width from columns ``n`` and ``sd``."""
    if frame.is_empty():
        return frame.with_columns(pl.lit(None, dtype=pl.Float64).alias(out))
    values = [t_half_width(k, s) for k, s in zip(frame[n].to_list(), frame[sd].to_list(), strict=False)]
    return frame.with_columns(pl.Series(out, values, dtype=pl.Float64))


#: z_{0.975}: the 95% two-sided normal quantile.
Z95 = float(sps.norm.ppf(0.975))


def pool_seeds(per_seed: pl.DataFrame, keep: tuple[str, ...] | list[str] = ()) -> pl.DataFrame:
    """Pool per-seed summaries of per-sample values into one row per (experiment, variation).

    ``per_seed`` has one row per (experiment, variation, seed) with ``n`` values, their
    ``mean`` and sample variance ``var`` (as DuckDB's ``count``, ``avg``, ``var_samp``; NULL
    for one value). The result has ``n`` (samples), ``n_seeds``, the pooled ``mean`` and ``sd``
    of all samples, ``se = sd / √n``, the 95 % interval ``ci_low`` … ``ci_high`` bootstrapped over
    samples clustered by seed — :func:`fcr_eval.analysis.stats.clustered_interval`, the rule
    ``fcr-eval report``'s paired table uses — and ``ci95``, half its width; ``seed_min`` /
    ``seed_max`` (the range of the per-seed means), ``n_nonfinite`` when given, and the columns of
    ``keep`` (constant within a variation).

    Example:
        >>> f = pl.DataFrame({"experiment": ["e", "e"], "variation": ["v", "v"], "seed": [0, 1],
        ...                   "n": [2, 2], "mean": [1.0, 3.0], "var": [0.0, 0.0]})
        >>> pool_seeds(f).select("n", "n_seeds", "mean", "sd", "seed_min", "seed_max").row(0)
        (4, 2, 2.0, 1.1547005383792515, 1.0, 3.0)
    """
    intervals = {}
    for key, g in (per_seed.filter(pl.col("n") > 0).group_by(["experiment", "variation"], maintain_order=True)
                   if not per_seed.is_empty() else ()):
        _, lo, hi = clustered_interval(g["n"].to_list(), g["mean"].to_list(),
                                       [v if v is not None else float("nan") for v in g["var"].to_list()])
        intervals[tuple(key)] = (lo, hi)
    keys = ["experiment", "variation"]
    if per_seed.is_empty():
        return pl.DataFrame(schema={**{k: pl.String for k in keys}, "n": pl.Int64, "n_seeds": pl.Int64,
                                    "mean": pl.Float64, "sd": pl.Float64, "se": pl.Float64,
                                    "ci_low": pl.Float64, "ci_high": pl.Float64,
                                    "ci95": pl.Float64, "seed_min": pl.Float64, "seed_max": pl.Float64})
    f = per_seed.filter(pl.col("n") > 0).with_columns(pl.col("var").fill_null(0.0))
    n_total = pl.col("n").sum()
    pooled = (pl.col("n") * pl.col("mean")).sum() / n_total
    extra = [pl.col("n_nonfinite").sum()] if "n_nonfinite" in f.columns else []
    out = f.group_by(keys, maintain_order=True).agg(
        n_total.alias("n"),
        pl.len().alias("n_seeds"),
        pooled.alias("mean"),
        # total sum of squares = within-seed + between-seed parts
        (((pl.col("n") - 1) * pl.col("var")).sum()
         + (pl.col("n") * (pl.col("mean") - pooled) ** 2).sum()).alias("_ss"),
        pl.col("mean").min().alias("seed_min"),
        pl.col("mean").max().alias("seed_max"),
        *extra,
        *[pl.col(c).first() for c in keep if c in f.columns],
    )
    sd = (pl.col("_ss") / (pl.col("n") - 1)).sqrt()
    out = out.with_columns(pl.when(pl.col("n") > 1).then(sd).otherwise(None).alias("sd")).with_columns(
        (pl.col("sd") / pl.col("n").sqrt()).alias("se")).drop("_ss")
    bounds = [intervals.get((e, v), (None, None)) for e, v in zip(out["experiment"], out["variation"], strict=True)]
    out = out.with_columns(pl.Series("ci_low", [b[0] for b in bounds], dtype=pl.Float64),
                           pl.Series("ci_high", [b[1] for b in bounds], dtype=pl.Float64)).with_columns(
        ((pl.col("ci_high") - pl.col("ci_low")) / 2).alias("ci95"))
    first = [*keys, "n", "n_seeds", "mean", "sd", "se", "ci_low", "ci_high", "ci95", "seed_min", "seed_max"]
    return out.select(*first, *[c for c in out.columns if c not in first])


def format_mean_ci(mean: float | None, ci: float | None, digits: int = 4) -> str:
    """``"12.34 ± 0.56"``, or the mean alone where no interval exists (one seed)."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "—"
    fmt = f"{{:.{digits}g}}"
    if ci is None or (isinstance(ci, float) and math.isnan(ci)):
        return fmt.format(mean) + " (n=1)"
    return f"{fmt.format(mean)} ± {fmt.format(ci)}"


def interval_bounds(frame: pl.DataFrame) -> list[pl.Expr]:
    """``lo``/``hi`` of each row's interval: ``ci_low``/``ci_high`` where the frame has them (a
    per-sample metric's seed-clustered interval), else ``mean ± ci95`` (a t-interval over seeds)."""
    if "ci_low" in frame.columns:
        return [pl.col("ci_low").fill_null(pl.col("mean")).alias("lo"),
                pl.col("ci_high").fill_null(pl.col("mean")).alias("hi")]
    return [(pl.col("mean") - pl.col("ci95").fill_null(0)).alias("lo"),
            (pl.col("mean") + pl.col("ci95").fill_null(0)).alias("hi")]


def format_interval(mean: float | None, low: float | None, high: float | None, digits: int = 4) -> str:
    """``"0.0123 [0.0101, 0.0149]"``, or the mean alone where no interval exists."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "—"
    fmt = f"{{:.{digits}g}}"
    if low is None or high is None or (isinstance(low, float) and math.isnan(low)):
        return fmt.format(mean) + " (n=1)"
    return f"{fmt.format(mean)} [{fmt.format(low)}, {fmt.format(high)}]"


def pareto_front(x: list[float], y: list[float], lower_y_is_better: bool) -> list[bool]:
    """Which points are on the Pareto front when smaller ``x`` is better (seconds per image).

    A point is on the front when no other point is at least as good on both axes and strictly
    better on one.
    """
    sign = 1.0 if lower_y_is_better else -1.0
    pts = [(a, sign * b) for a, b in zip(x, y, strict=False)]
    front = []
    for i, (xi, yi) in enumerate(pts):
        if xi is None or yi is None or math.isnan(xi) or math.isnan(yi):
            front.append(False)
            continue
        dominated = any(
            (xj <= xi and yj <= yi and (xj < xi or yj < yi))
            for j, (xj, yj) in enumerate(pts)
            if j != i and xj is not None and yj is not None
        )
        front.append(not dominated)
    return front


@dataclass(frozen=True)
class LinearFit:
    """Least-squares line ``y = slope·x + intercept`` with its R² and Pearson r."""

    slope: float
    intercept: float
    r2: float
    pearson_r: float
    p_value: float
    n: int


def linear_fit(x: list[float], y: list[float]) -> LinearFit | None:
    """Least-squares line of ``y`` on ``x`` with Pearson r and R² (fcr-eval's
    :func:`~fcr_eval.analysis.stats.pearson_r2`); ``None`` with fewer than 3 points or a constant axis."""
    pairs = [(a, b) for a, b in zip(x, y, strict=False) if a is not None and b is not None]
    xs = np.array([p[0] for p in pairs], dtype=float)
    ys = np.array([p[1] for p in pairs], dtype=float)
    if len(pairs) < 3 or np.ptp(xs) == 0 or np.ptp(ys) == 0:
        return None
    corr = pearson_r2(xs, ys)
    slope, intercept = np.polyfit(xs, ys, 1)
    return LinearFit(float(slope), float(intercept), corr.r2, corr.r, corr.p_value, corr.n)
