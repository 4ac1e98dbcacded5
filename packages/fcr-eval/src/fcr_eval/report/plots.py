"""PNG plots of an experiment from the store (matplotlib, Agg backend).

* ``quality_vs_stride.png`` — quality metric against stride, one line per weights (base, each λ),
  mean ± 95 % CI over seeds; no-cache drawn at stride 1; DeepCache as separate markers.
* ``sigma2_vs_delta.png`` — σ²_Δ (all encoder features) against Δ, one line per distinct weights.
* ``sigma2_vs_quality.png`` — mean σ²_Δ against the quality difference to the baseline, with the
  least-squares line and R² (the ``criteria.r2_variations`` if given, else every variation).
* ``samples_<variation>.png`` — the sample grid of each variation (first seed).

Example::

    make_plots(exp, ResultsStore("results/fcr.duckdb"), Path("results/plots/mini-exp-1"))
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np

from fcr_eval.spec.experiment import Experiment
from fcr_eval.spec.vocabulary import INDEPENDENT_FINETUNES
from fcr_eval.store import ResultsStore

__all__ = ["make_plots", "pyplot", "save_figure"]

logger = logging.getLogger(__name__)


def pyplot():
    """matplotlib.pyplot on the Agg backend with the house style (imported on first use)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 11, "axes.titlesize": 12, "axes.grid": True, "grid.alpha": 0.3,
                         "figure.dpi": 110, "savefig.bbox": "tight"})
    return plt


def _on_stride_axis(v) -> bool:
    """Whether a variation has a place on a stride axis: no cache (stride 1) or a uniform stride.
    Adaptive caches and explicit schedules have none; the stride plots leave them out."""
    return v.sampler == "none" or v.stride is not None


def _seed_mean_half_width(vals):
    """Mean over seeds and the half-width of its t-interval (:func:`fcr_eval.analysis.stats.mean_ci`),
    for error bars; a single seed has no bar."""
    from fcr_eval.analysis.stats import mean_ci

    vals = [float(x) for x in vals if x is not None and np.isfinite(x)]
    if not vals:
        return None, None
    if len(vals) < 2:
        return vals[0], 0.0
    ci = mean_ci(vals)
    return ci.mean, ci.half_width


def _weights_label(v, exp: Experiment | None = None) -> str:
    """The weights a variation samples, e.g. ``embedded FCR λ=0.15 Δ:steps relative_mse``."""
    if v.lambda_rollout is not None:
        return (f"{v.model} rollout λ={v.lambda_rollout:g} ({v.rollout_cache or 'fd'}, "
                f"k={v.rollout_k if v.rollout_k is not None else 'default'})")
    if v.lambda_oc is not None:
        return f"{v.model} output consistency λ={v.lambda_oc:g} ({v.oc_cache or 'fd'})"
    if v.lambda_fcr is None:
        return f"{v.model} base"
    if v.lambda_fcr == 0:
        return f"{v.model} fine-tuned λ=0"
    ft = exp.finetune if exp is not None else None
    unit = v.delta_unit or (ft.delta_unit if ft else "timesteps")
    distance = v.distance or (ft.distance if ft else "mse")
    blocks = v.blocks or (ft.blocks if ft else "all")
    extra = ("" if unit == "timesteps" else " Δ:steps") + ("" if distance == "mse" else f" {distance}") + \
        ("" if blocks == "all" else f" {blocks} blocks")
    return f"{v.model} FCR λ={v.lambda_fcr:g}{extra}"


def make_plots(exp: Experiment, store: ResultsStore, out_dir: Path) -> list[Path]:
    """Write the plots of ``exp`` to ``out_dir``; returns the files written."""
    import polars as pl

    from fcr_eval.metrics.extractors import metric_name

    plt = pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    qname = exp.criteria.quality_metric if exp.criteria else metric_name("fd", exp.evaluation.feature_extractor)
    metrics = store.metrics(experiment_id=exp.id)
    fstats = store.feature_stats(experiment_id=exp.id)
    files: list[Path] = []
    if metrics.height == 0:
        logger.warning("no runs of %s in the store yet; no plots", exp.id)
        return files
    q = metrics.filter(pl.col("metric") == qname)

    def qvals(vid):
        return q.filter(pl.col("variation_id") == vid)["value"].to_list() if q.height else []

    qlabel = f"{qname} (lower is better)"
    # 1. quality vs stride, per weights (and robustness condition)
    groups: dict[str, list] = {}
    for v in exp.variations:
        if v.sampler == "deepcache" or not _on_stride_axis(v):
            continue
        key = _weights_label(v, exp) + ("" if v.robustness == "none" else f", {v.robustness}") + \
            ("" if (v.scheduler or exp.sampling.scheduler) == exp.sampling.scheduler else f", {v.scheduler}")
        groups.setdefault(key, []).append(v)
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    plotted = False
    dodge = {k: (i - (len(groups) - 1) / 2) * 0.3 for i, k in enumerate(groups)}  # keep error bars apart
    for label, vs in groups.items():
        pts = []
        for v in vs:
            m, h = _seed_mean_half_width(qvals(v.id))
            if m is not None:
                pts.append((1 if v.sampler == "none" else v.stride, m, h))
        if not pts:
            continue
        pts.sort()
        xs, ys, hs = zip(*pts, strict=False)
        xs = [x + dodge[label] for x in xs]
        ax.errorbar(xs, ys, yerr=hs, marker="o", capsize=3, label=label)
        plotted = True
    for v in exp.variations:
        if v.sampler == "deepcache" and _on_stride_axis(v):
            m, h = _seed_mean_half_width(qvals(v.id))
            if m is not None:
                ax.errorbar([v.stride], [m], yerr=[h], marker="s", linestyle="none", capsize=3,
                            label=f"DeepCache N={v.stride} ({_weights_label(v, exp)})")
                plotted = True
    if plotted:
        ax.set_xlabel("stride k (key step every k steps; 1 = no cache)")
        ax.set_ylabel(qlabel)
        ax.set_title(f"{exp.id}: quality against stride (mean ± 95% CI over seeds)")
        ax.legend(fontsize=9)
        strides = sorted({1, *(v.stride for v in exp.variations if v.stride)})
        ax.set_xticks(strides)
        files.append(save_figure(fig, out_dir / "quality_vs_stride.png", plt))
    else:
        plt.close(fig)

    # 2. σ²_Δ vs Δ, one line per distinct weights (σ²_Δ does not depend on the sampler)
    if fstats.height:
        fa = fstats.filter(pl.col("block") == "all")
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        seen = set()
        for v in exp.variations:
            label = _weights_label(v, exp)
            if label in seen:
                continue
            g = fa.filter(pl.col("variation_id") == v.id)
            if g.height == 0:
                continue
            seen.add(label)
            deltas = sorted(set(g["delta"].to_list()))
            ms, hs = zip(*(_seed_mean_half_width(g.filter(pl.col("delta") == d)["variance"].to_list()) for d in deltas), strict=False)
            off = (len(seen) - 2) * 0.08  # small x offset keeps the error bars of the lines apart
            ax.errorbar([d + off for d in deltas], ms, yerr=hs, marker="o", capsize=3, label=label)
        ax.set_xlabel("Δ (timesteps between the two noisy inputs)")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        ax.set_ylabel("σ²_Δ = Var(Enc(x_t) − Enc(x_{t−Δ}))")
        ax.set_title(f"{exp.id}: encoder-feature variance, all encoder features")
        ax.legend(fontsize=9)
        files.append(save_figure(fig, out_dir / "sigma2_vs_delta.png", plt))

        # 3. σ²_Δ (mean over Δ) vs quality difference to the baseline, with R²
        base = exp.criteria.baseline if exp.criteria else None
        chosen = list(exp.criteria.r2_variations) if exp.criteria and exp.criteria.r2_variations else \
            [v.id for v in exp.variations]
        bm, _ = _seed_mean_half_width(qvals(base)) if base else (None, None)
        xs, ys, names = [], [], []
        for vid in chosen:
            g = fa.filter(pl.col("variation_id") == vid)
            qm, _ = _seed_mean_half_width(qvals(vid))
            if g.height == 0 or qm is None or bm is None:
                continue
            s2, _ = _seed_mean_half_width(g.group_by("seed").agg(pl.col("variance").mean())["variance"].to_list())
            xs.append(s2)
            ys.append(qm - bm)
            names.append(vid)
        if len(xs) >= 2:
            fig, ax = plt.subplots(figsize=(7.5, 4.8))
            ax.scatter(xs, ys, s=40, zorder=3)
            for x, y, nme in zip(xs, ys, names, strict=False):
                ax.annotate(nme, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=9)
            title = f"{exp.id}: σ²_Δ against Δ{qname} vs {base}"
            if len(xs) >= 3 and np.ptp(xs) > 0 and np.ptp(ys) > 0:
                from fcr_eval.analysis.stats import pearson_r2

                corr = pearson_r2(xs, ys)
                a, b = np.polyfit(xs, ys, 1)
                gx = np.linspace(min(xs), max(xs), 20)
                ax.plot(gx, a * gx + b, "--", color="gray", label=f"least squares, R² = {corr.r2:.2f} (R = {corr.r:.2f})")
                ax.legend(fontsize=9)
            ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 3))
            ax.set_xlabel("σ²_Δ, mean over Δ = 1…Δmax (all encoder features)")
            ax.set_ylabel(f"Δ{qname} vs {base}")
            ax.set_title(title, fontsize=11)
            files.append(save_figure(fig, out_dir / "sigma2_vs_quality.png", plt))

    files += _paired_plots(exp, store, out_dir, plt)

    # 4. sample grids (made by the runner in each run folder; copied here, first seed)
    runs = store.runs(experiment_id=exp.id)
    if runs.height and "run_dir" in runs.columns:
        for v in exp.variations:
            r = runs.filter(pl.col("variation_id") == v.id).sort("seed")
            if r.height == 0 or not r["run_dir"][0]:
                continue
            grid = Path(r["run_dir"][0]) / "grid.png"
            if not grid.is_absolute() and not grid.is_file():
                grid = store.root / grid
            if grid.is_file():
                dst = out_dir / f"samples_{v.id}.png"
                shutil.copyfile(grid, dst)
                files.append(dst)
    return files


def _paired_plots(exp: Experiment, store: ResultsStore, out_dir: Path, plt) -> list[Path]:
    """Plots of the paired evaluation: cache error against stride per weights, scale-free σ²_Δ over
    the cache's range, the stored recovered-fraction contrasts, and each fine-tune's FCR term."""

    import polars as pl

    from fcr_eval.analysis.stats import clustered_mean_ci as boot_ci

    files: list[Path] = []
    sm = store.sample_metrics(experiment_id=exp.id, metric="cache_mse")
    if sm.height:
        groups: dict[str, list] = {}
        for v in exp.variations:
            if v.sampler != "deepcache" and v.robustness == "none" and _on_stride_axis(v):
                groups.setdefault(_weights_label(v, exp), []).append(v)
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        for label, vs in groups.items():
            pts = []
            for v in vs:
                d = sm.filter(pl.col("variation_id") == v.id)
                if d.height:
                    m, lo, hi = boot_ci(d["value"].to_numpy(), d["seed"].to_numpy())
                    pts.append((1 if v.sampler == "none" else v.stride, m, m - lo, hi - m))
            if pts:
                pts.sort()
                xs, ms, los, his = zip(*pts, strict=True)
                ax.errorbar(xs, ms, yerr=[los, his], marker="o", capsize=3, label=label)
        ax.set_xlabel("stride k (1 = no cache)")
        ax.set_ylabel("cache MSE to the same weights' uncached sample")
        ax.set_title(f"{exp.id}: cache error against stride (mean, 95% CI over samples by seed)", fontsize=11)
        ax.legend(fontsize=8)
        files.append(save_figure(fig, out_dir / "cache_error_vs_stride.png", plt))

    fs = store.feature_stats(experiment_id=exp.id, block="all", unit="sampler_steps")
    if fs.height and "energy" in fs.columns:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
        seen = set()
        step = exp.sampling.num_inference_steps
        for v in exp.variations:
            label = _weights_label(v, exp)
            g = fs.filter(pl.col("variation_id") == v.id)
            if label in seen or g.height == 0:
                continue
            seen.add(label)
            g = g.with_columns((pl.col("variance") / pl.col("energy")).alias("scale_free"))
            agg = g.group_by("delta").agg(pl.col("variance").mean(), pl.col("scale_free").mean()).sort("delta")
            k = agg["delta"].to_numpy() / (1000 / step)
            axes[0].plot(k, agg["variance"].to_numpy(), marker="o", label=label)
            axes[1].plot(k, agg["scale_free"].to_numpy(), marker="o", label=label)
        axes[0].set_ylabel("σ²_Δ (all encoder features)")
        axes[1].set_ylabel("σ²_Δ / feature energy (scale-free)")
        for ax in axes:
            ax.set_xlabel(f"Δ in sampler steps (1 step = {1000 // step} DDPM timesteps)")
        axes[1].legend(fontsize=8)
        fig.suptitle(f"{exp.id}: encoder-feature change over the range the cache reuses (mean over seeds)")
        files.append(save_figure(fig, out_dir / "sigma2_vs_sampler_steps.png", plt))

    c = store.contrasts(exp.id)
    if c.height:
        for kind, title, fname in (
                ("recovered_fraction", "fraction of the stride gap recovered (cache MSE; 0 = control, 1 = small "
                 "stride)", "recovered_fraction.png"),
                ("difference", "difference, candidate − baseline", "contrast_differences.png")):
            rows = c.filter(pl.col("kind") == kind).sort("contrast_id")
            if rows.height:
                files.append(_contrast_forest(exp, rows, kind, title, out_dir / fname, plt))

    runs = store.runs(experiment_id=exp.id)
    curves = {}
    for r in runs.iter_rows(named=True):
        params = json.loads(r["params"]) if isinstance(r["params"], str) else (r["params"] or {})
        ft = params.get("finetune") or {}
        path = Path(ft.get("run_dir") or "") / "metrics.jsonl"
        # the rollout term's λ is a variation setting in params (runs has columns for FCR's and OC's)
        term = "rollout" if params.get("lambda_rollout") else "oc" if r.get("lambda_oc") else "fcr"
        if ft.get("run_dir") and path.is_file() and (r["lambda_fcr"] or term != "fcr"):
            v = exp.variation(r["variation_id"]) if hasattr(exp, "variation") else None
            label = _weights_label(v, exp) if v is not None else str(ft.get("run_dir"))
            if label not in curves:
                rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
                share = f"{term}_to_denoise"
                curves[label] = [(x["step"], x[share]) for x in rows if x.get(share) is not None]
    if curves:
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        for label, pts in curves.items():
            if pts:
                xs, ys = zip(*pts, strict=True)
                w = max(1, len(ys) // 25)
                smooth = np.convolve(ys, np.ones(w) / w, mode="valid")
                ax.plot(xs[w - 1:], smooth, label=label)
        ax.set_yscale("log")
        ax.set_xlabel("fine-tune step")
        ax.set_ylabel("λ·L / L_denoise (moving mean; L = L_FCR, L_OC or L_rollout)")
        ax.set_title(f"{exp.id}: the fine-tuning term during fine-tuning", fontsize=11)
        ax.legend(fontsize=8)
        files.append(save_figure(fig, out_dir / "fcr_term_curve.png", plt))
    return files


def _details(row) -> dict:
    d = row["details"]
    return json.loads(d) if isinstance(d, str) else (d or {})


def _contrast_forest(exp: Experiment, rows, kind: str, xlabel: str, path: Path, plt) -> Path:
    """Each contrast's estimate and 95 % interval, with one dot per fine-tune (cluster) where the
    seeds carry independent fine-tunes, so the interval can be read against the spread it holds."""
    fig, ax = plt.subplots(figsize=(8, 0.55 * rows.height + 1.9))
    ys = np.arange(rows.height)
    for y, r in zip(ys, rows.iter_rows(named=True), strict=True):
        details = _details(r)
        independent = details.get("replication") == INDEPENDENT_FINETUNES
        colour = "tab:blue" if independent else "tab:gray"
        lo, hi = r["ci_low"], r["ci_high"]
        if np.isfinite(lo) and np.isfinite(hi):
            ax.plot([lo, hi], [y, y], color=colour, lw=2)
        ax.plot(r["estimate"], y, "o", color=colour, ms=7)
        dots = (details.get("clusters") or {}).get("estimates") or []
        if independent and dots:
            ax.plot(dots, [y + 0.28] * len(dots), "|", color="black", ms=9, alpha=0.6)
        if r["threshold"] is not None:
            ax.plot([r["threshold"]] * 2, [y - 0.3, y + 0.3], color="tab:red", lw=1.5)
    labels = [f"{r['contrast_id']}\n({_details(r).get('noise', 'noise not recorded')})" for r in rows.iter_rows(named=True)]
    ax.set_yticks(ys, labels, fontsize=7)
    ax.axvline(0, color="gray", lw=1)
    if kind == "recovered_fraction":
        ax.axvline(1, color="gray", lw=1, ls=":")
    ax.set_xlabel(xlabel)
    ax.set_title(f"{exp.id}: {kind.replace('_', ' ')} contrasts, 95% interval; ticks above a bar: one per "
                 "fine-tune; red: threshold; grey: sampling noise only", fontsize=9)
    return save_figure(fig, path, plt)


def save_figure(fig, path: Path, plt) -> Path:
    """Write ``fig`` to ``path`` (tight layout) and close it."""
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
