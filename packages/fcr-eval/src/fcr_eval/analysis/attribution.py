"""Summaries of the cache-error attribution (``fcr_sample.attribute_cache_error`` rows, as the
store's ``cache_attribution`` table holds them): step × feature matrices, per-feature change
against gain, and how the final error splits over the served steps.

Every function takes a polars frame with the columns ``step, feature, quantity, value`` (and a
``run`` column naming the run / fine-tune where rows of several are mixed: matrices are then the
mean over runs). No store, no torch.

Example:
    >>> steps, features, m = attribution_matrix(rows, "only_stale_error")
    >>> feature_summary(rows).select("feature", "relative_change", "gain")
"""

from __future__ import annotations

import numpy as np
import polars as pl

__all__ = ["attribution_matrix", "feature_summary", "step_summary", "compounding"]

#: The step-wide rows' ``feature``, as fcr-sample writes them.
ALL = "all"


def _check(frame: pl.DataFrame) -> None:
    missing = {"step", "feature", "quantity", "value"} - set(frame.columns)
    if missing:
        raise ValueError(f"attribution rows need the columns step, feature, quantity, value; missing {sorted(missing)}")


def attribution_matrix(frame: pl.DataFrame, quantity: str) -> tuple[list[int], list[str], np.ndarray]:
    """``(steps, features, matrix)`` of ``quantity`` per served step (rows) and cached feature
    (columns, in first-seen order, i.e. the forward order fcr-sample writes), the mean over the
    runs ``frame`` mixes; NaN where a cell has no value (an undefined gain).

    Example:
        >>> steps, feats, m = attribution_matrix(rows, "relative_change"); m.shape
        (18, 4)
    """
    _check(frame)
    f = frame.filter((pl.col("quantity") == quantity) & (pl.col("feature") != ALL))
    features = list(dict.fromkeys(f["feature"].to_list()))
    steps = sorted(set(f["step"].to_list()))
    cell = f.group_by("step", "feature").agg(pl.col("value").mean())
    m = np.full((len(steps), len(features)), np.nan)
    si, fi = {s: i for i, s in enumerate(steps)}, {x: j for j, x in enumerate(features)}
    for s, x, v in cell.iter_rows():
        m[si[s], fi[x]] = v
    return steps, features, m


def _per_run(frame: pl.DataFrame) -> pl.DataFrame:
    return frame if "run" in frame.columns else frame.with_columns(run=pl.lit("run"))


def feature_summary(frame: pl.DataFrame) -> pl.DataFrame:
    """Per run and cached feature, over the served steps: the mean scale-free change
    (``relative_change``), the mean one-step ε error with only that feature stale, the mean with
    only it fresh, the gain ``mean error / mean change`` (a ratio of means: steps where a feature
    barely changed do not blow it up), and the feature's share of the summed only-stale errors.

    Example:
        >>> feature_summary(rows).filter(pl.col("feature") == "mid_block")["gain"][0]
    """
    _check(frame)
    f = _per_run(frame).filter(pl.col("feature") != ALL)
    wide = (f.filter(pl.col("quantity").is_in(["relative_change", "only_stale_error", "only_fresh_error"]))
            .group_by("run", "feature", "quantity").agg(pl.col("value").mean())
            .pivot(on="quantity", index=["run", "feature"], values="value"))
    return (wide.with_columns(
        gain=pl.when(pl.col("relative_change") > 0).then(pl.col("only_stale_error") / pl.col("relative_change")),
        share=pl.col("only_stale_error") / pl.col("only_stale_error").sum().over("run"))
        .sort("run", "feature"))


def step_summary(frame: pl.DataFrame) -> pl.DataFrame:
    """Per run and served step: ``eps_error`` (all features stale), ``relative_change``,
    ``decoder_gain``, ``final_error`` (propagation: only this step served from the cache) and the
    step's share of the summed propagations (``final_share``, NaN-free only with propagation)."""
    _check(frame)
    f = _per_run(frame).filter(pl.col("feature") == ALL)
    wide = f.pivot(on="quantity", index=["run", "step"], values="value", aggregate_function="mean")
    if "final_error" in wide.columns:
        wide = wide.with_columns(final_share=pl.col("final_error") / pl.col("final_error").sum().over("run"))
    return wide.sort("run", "step")


def compounding(sum_of_steps: float, sum_of_roots: float, full_error: float) -> dict[str, float]:
    """How the served steps' errors combine into the whole cached run's final error.

    With ``e_i`` the final error when only step i is served (relative squared error) and ``E`` the
    final error with every step served: independent errors add in square (``E ≈ Σ e_i``), errors
    that push the same way add in amplitude (``E ≈ (Σ √e_i)²``), and ``E`` above both means the
    errors compound (a step's error grows the next one's). Returns both ratios.

    Args:
        sum_of_steps: ``Σ e_i``.
        sum_of_roots: ``Σ √e_i``.
        full_error: ``E``.

    Example:
        >>> compounding(0.01, 0.2, 0.03)["vs_independent"]
        3.0
    """
    if sum_of_steps <= 0 or sum_of_roots <= 0:
        raise ValueError("the summed one-step propagations must be > 0 (was the propagation measured?)")
    return {"vs_independent": full_error / sum_of_steps, "vs_aligned": full_error / sum_of_roots ** 2}
