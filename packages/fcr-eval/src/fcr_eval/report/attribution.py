"""Plots of the cache-error attribution (the store's ``cache_attribution`` rows), per weights.

One PNG per cached variation, ``attribution_<variation>.png``, mean over its seeds:

* step × feature heat map of the one-step ε error with only that feature stale
  (``only_stale_error``);
* step × feature heat map of the scale-free feature change on the trajectory
  (``relative_change``, σ²_Δ / energy);
* the decoder's gain per feature (mean error / mean change over the served steps);
* the propagation per step: the final sample's error when only that step is served from the
  cache (``final_error``), next to the one-step ε error with every feature stale.

Example::

    attribution_plots(exp, ResultsStore("results/fcr.duckdb"), Path("results/plots/exp"))
    plot_cache_attribution(rows, Path("attr.png"), "FD-10, base weights")
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import polars as pl

from fcr_eval.analysis.attribution import attribution_matrix, feature_summary, step_summary
from fcr_eval.spec.experiment import Experiment
from fcr_eval.store import ResultsStore

__all__ = ["plot_cache_attribution", "attribution_plots"]

logger = logging.getLogger(__name__)


def _heat(ax, fig, frame: pl.DataFrame, quantity: str, title: str) -> None:
    steps, features, m = attribution_matrix(frame, quantity)
    # log colour scale: the errors span orders of magnitude between steps
    shown = np.log10(np.clip(m, 1e-12, None)).T
    im = ax.imshow(shown, aspect="auto", cmap="magma", interpolation="nearest")
    ax.set_xticks(range(len(steps)), [str(s) for s in steps], fontsize=7)
    ax.set_yticks(range(len(features)), features, fontsize=8)
    ax.set_xlabel("sampler step")
    ax.set_title(title, fontsize=10)
    ax.grid(False)
    fig.colorbar(im, ax=ax, label="log10")


def plot_cache_attribution(frame: pl.DataFrame, path: Path, title: str) -> Path:
    """Write the four-panel attribution figure of ``frame`` (rows ``step, feature, quantity,
    value``; several runs are averaged, a ``run`` column keeps them apart for the gain) to
    ``path``.

    Args:
        frame: attribution rows, e.g. ``store.cache_attribution(exp_id, variation_id)`` or a
            frame of ``fcr_sample.CacheAttribution.to_rows()``.
        path: the PNG to write (its folder is created).
        title: the figure's title (cache and weights).

    Returns:
        ``path``.

    Raises:
        ValueError: ``frame`` has no attribution rows.
    """
    from fcr_eval.report.plots import pyplot, save_figure

    if frame.height == 0:
        raise ValueError(f"no attribution rows to plot for {title!r}")
    plt = pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(2, 2, figsize=(13, 7.5))
    _heat(axes[0, 0], fig, frame, "only_stale_error", "one-step ε error, only this feature stale")
    _heat(axes[0, 1], fig, frame, "relative_change", "feature change on the trajectory (σ²_Δ / energy)")
    feats = feature_summary(frame).group_by("feature", maintain_order=True).agg(pl.col("gain").mean())
    order = list(dict.fromkeys(frame.filter(pl.col("feature") != "all")["feature"].to_list()))
    gains = dict(feats.iter_rows())
    ax = axes[1, 0]
    ax.bar(range(len(order)), [gains.get(f) or 0.0 for f in order], color="#4c72b0")
    ax.set_xticks(range(len(order)), order, fontsize=8, rotation=20)
    ax.set_yscale("log")
    ax.set_ylabel("gain: ε error / feature change")
    ax.set_title("decoder gain per feature (mean over served steps)", fontsize=10)
    steps = step_summary(frame).group_by("step").agg(pl.exclude("run").mean()).sort("step")
    ax = axes[1, 1]
    ax.semilogy(steps["step"], steps["eps_error"], "o-", label="one-step ε error (all stale)")
    if "final_error" in steps.columns:
        ax.semilogy(steps["step"], steps["final_error"], "s-", label="final error, only this step cached")
    ax.set_xlabel("sampler step")
    ax.set_ylabel("relative squared error")
    ax.set_title("where the error enters and how much reaches the sample", fontsize=10)
    ax.legend(fontsize=8)
    fig.suptitle(title)
    return save_figure(fig, path, plt)


def attribution_plots(exp: Experiment, store: ResultsStore, out_dir: Path) -> list[Path]:
    """One :func:`plot_cache_attribution` PNG per variation of ``exp`` with attribution rows in
    ``store`` (mean over its seeds); returns the files written (none without rows)."""
    from fcr_eval.report.plots import _weights_label

    rows = store.cache_attribution(experiment_id=exp.id)
    files = []
    for v in exp.variations:
        f = rows.filter(pl.col("variation_id") == v.id)
        if f.height == 0:
            continue
        runs = store.runs(experiment_id=exp.id, variation_id=v.id)
        cache = runs["cache_label"][0] if runs.height and "cache_label" in runs.columns else v.sampler
        seeds = sorted(set(f["seed"].to_list()))
        title = (f"{exp.id} {v.id}: {cache} on {_weights_label(v, exp)}, "
                 f"{f['n_samples'][0]} samples × {len(seeds)} seed(s)")
        files.append(plot_cache_attribution(f.rename({"run_id": "run"}), out_dir / f"attribution_{v.id}.png",
                                            title))
    if files:
        logger.info("wrote %d attribution plot(s) to %s", len(files), out_dir)
    return files
