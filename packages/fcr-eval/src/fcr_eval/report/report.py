"""Reporting an experiment from the store: the summary table (mean ± 95 % CI over seeds), the
notes that say what produced its numbers, the contrasts, the success-criteria board and the plots.

The report reads the store only (it opens it read-only and computes nothing but statistics):
each contrast's replication comes from the weights the stored runs sampled, not from a plan, and
the verdicts it computes are returned in the :class:`Report` for whoever keeps them
(``fcr-eval run`` writes them to the store's ``contrasts`` and ``criteria`` tables).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fcr_eval.analysis.replication import RunWeights, contrast_replication
from fcr_eval.analysis.stats import clustered_mean_ci
from fcr_eval.spec.experiment import Experiment
from fcr_eval.spec.names import safe_child
from fcr_eval.spec.vocabulary import CLASSIFIERS, SAMPLE_METRICS, SHARED_FINETUNE, metric_spec
from fcr_eval.store import ResultsStore

__all__ = ["Report", "markdown_table", "summary_table", "paired_table", "contrasts_report", "criteria_table",
           "stored_weights", "report"]


def _fmt_ci(mean: float, lo: float, hi: float) -> str:
    if not np.isfinite(mean):
        return "–"
    if lo == hi:
        return f"{mean:.4g}"
    return f"{mean:.4g} [{lo:.3g}, {hi:.3g}]"


#: Per-sample metrics of the paired table, in the registry's order, with their column titles.
PAIRED_COLUMNS = tuple((name, m.title) for name, m in SAMPLE_METRICS.items())


def paired_table(exp: Experiment, per_sample) -> str:
    """Markdown table: one row per variation, each per-sample metric's mean with a bootstrap CI over
    samples clustered by seed (every variation of a seed starts from the same x_T and prompts).
    PSNR is the median over finite values (identical images have infinite PSNR)."""
    import polars as pl

    if per_sample is None or per_sample.height == 0:
        return ""
    present = [(m, t) for m, t in PAIRED_COLUMNS if m in set(per_sample["metric"].unique().to_list())]
    head = ["variation", "n (seeds)"] + [t for _, t in present]
    rows = []
    for v in exp.variations:
        d = per_sample.filter(pl.col("variation_id") == v.id)
        if d.height == 0:
            continue
        n = d.filter(pl.col("metric") == present[0][0]).height if present else 0
        row = [v.id, f"{n} ({d['seed'].n_unique()})"]
        for m, _ in present:
            dm = d.filter(pl.col("metric") == m)
            vals = dm["value"].to_numpy().astype(float)
            if m == "cache_psnr":
                fin = vals[np.isfinite(vals)]
                row.append("∞ (identical)" if len(vals) and not len(fin) else
                           (f"median {np.median(fin):.3g}" if len(fin) else "–"))
            else:
                row.append(_fmt_ci(*clustered_mean_ci(vals, dm["seed"].to_numpy())) if dm.height else "–")
        rows.append(row)
    return markdown_table(head, rows)


def _paired_notes() -> str:
    return ("cache MSE / PSNR / feat. L2: distance of each sample to the same weights' uncached sample from the "
            "same x_T and prompt (0 / ∞ for the uncached sampler itself); class correct / log-prob: the shipped "
            "classifier on the prompted class; CIs: two-stage bootstrap (seeds, then samples within a seed).")


def markdown_table(head: list[str], rows: list[list[str]]) -> str:
    """A Markdown table with padded columns: the one table builder of every report."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=False)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + " |" for r in rows]
    return "\n".join(lines)


def contrasts_report(exp: Experiment, per_sample, replication: dict[str, str]) -> tuple[str, list]:
    r"""Compute the experiment's ``[[contrasts]]`` from the stored per-sample metrics with the
    interval ``replication`` (contrast id → how its sides were replicated) calls for. Returns them
    as a markdown table — estimate, interval, what noise it holds, verdict and the precision plan
    in fine-tunes — and as :class:`~fcr_eval.analysis.contrasts.ContrastResult`\ s. A contrast whose
    variations have no stored samples yet is listed as not computed."""
    import polars as pl

    from fcr_eval.analysis.contrasts import compute_contrast

    specs = list(getattr(exp, "contrasts", ()) or ())
    if not specs:
        return "", []
    have = set(per_sample["variation_id"].unique().to_list()) if per_sample.height else set()
    results, rows = [], []
    for spec in specs:
        needed = {spec.candidate, spec.baseline} | ({spec.target} if spec.target else set())
        missing = sorted(needed - have)
        if missing:
            rows.append([spec.id, spec.kind, spec.metric, "–", "–", "–", "–", f"not computed: no samples of {missing}"])
            continue
        r = compute_contrast(spec, per_sample.filter(pl.col("variation_id").is_in(list(needed))),
                             replication=replication[spec.id])
        results.append(r)
        sides = f"{r.candidate} vs {r.baseline}" + (f" (target {r.target})" if r.target else "")
        crit = f"{r.verdict} ({r.direction} {r.threshold:g})" if r.verdict else ""
        if r.details.get("verdict_reason"):
            crit += f": {r.details['verdict_reason']}"
        precision = r.details.get("precision", {}).get("text", "")
        noise = f"{r.details['replication']}: {r.noise} ({r.method})"
        rows.append([r.contrast_id, r.kind, r.metric, f"{r.estimate:.4g} [{r.ci_low:.3g}, {r.ci_high:.3g}]",
                     f"{r.n_samples} ({r.n_clusters})", noise, crit, sides + (f"; {precision}" if precision else "")])
    return markdown_table(["contrast", "kind", "metric", "estimate [95% CI]", "pairs (seeds)", "interval holds",
                           "criterion", "compares; precision plan"], rows), results


def _contrast_notes(replication: dict[str, str]) -> str:
    """What the contrasts' intervals hold, in one paragraph under the table."""
    text = ("Intervals at the unit of replication: with one fine-tune per seed the seeds are the replicates "
            "(t over per-seed estimates, G − 1 df; Fieller's interval for a ratio; coverage checked by simulation, "
            "docs/benchmarks.md); where no fine-tune varies the pairs are (sampling noise is all there is).")
    if SHARED_FINETUNE in replication.values():
        text += (" A contrast between weights of one fine-tune shared by all seeds holds **sampling noise only**: it "
                 "says nothing about fine-tune-to-fine-tune variation and gets no PASS/FAIL about the method — the "
                 "decided answer with one fine-tune per seed is experiments/mini-exp-1-decide.toml "
                 "(docs/mini-exp-1-study/results.md).")
    return text


def _verdict_count_note(exp: Experiment, crit: list) -> str:
    """How many verdicts this store's report draws, and whether they are adjusted as a family."""
    n_contrasts = sum(1 for c in exp.contrasts if c.threshold is not None)
    n_crit = sum(1 for r in crit if r.verdict is not None)
    adj = exp.criteria.family_adjustment if exp.criteria is not None else "none"
    how = ("criteria Holm-adjusted as one family" if adj == "holm" else
           "each at its own 95 % (criteria.family_adjustment = \"holm\" adjusts the criteria as one family)")
    return (f"{n_crit + n_contrasts} verdicts drawn from this store ({n_crit} criteria, {n_contrasts} contrasts "
            f"with a threshold): {how}.")


def _set_size_note(exp: Experiment, store: ResultsStore) -> str:
    """Says when a Fréchet distance was computed from fewer samples than feature dimensions (its
    covariance is then singular and the number is only indicative; KID is unbiased)."""
    from fcr_eval.metrics.extractors import metric_name
    from fcr_eval.records import unestimable_fd

    m = store.metrics(experiment_id=exp.id, metric=metric_name("fd", exp.evaluation.feature_extractor))
    worst = unestimable_fd(m) if m.height else None
    if worst is None:
        return ""
    n, dim = worst
    return (f" **FD is indicative only:** each run's FD comes from {n} samples in {dim} feature dimensions "
            "(singular covariance, biased upwards); read KID and the paired metrics above instead.")


def _ci_text(values: list[float], digits: int = 3) -> str:
    from fcr_eval.analysis.stats import mean_ci

    vals = [float(x) for x in values if x is not None and np.isfinite(x)]
    if not vals:
        return "–"
    if len(vals) < 2:
        return f"{vals[0]:.{digits}g}"
    if len(vals) == 2:  # a t-interval from two values says little: show both
        return f"{np.mean(vals):.{digits}g} ({min(vals):.{digits}g}–{max(vals):.{digits}g})"
    ci = mean_ci(vals)
    return f"{ci.mean:.{digits}g} ± {ci.half_width:.2g}"


def summary_table(exp: Experiment, store: ResultsStore) -> str:
    """Markdown table: one row per variation, mean ± 95 % CI half-width over seeds."""
    import polars as pl

    from fcr_eval.metrics.extractors import metric_name

    metrics = store.metrics(experiment_id=exp.id)
    timings = store.timings(experiment_id=exp.id)
    # s/img from the interleaved timing session where it ran (every sampler timed side by side,
    # round by round); per-run timings otherwise.
    rounds = store.timing_rounds(exp.id)
    fstats = store.feature_stats(experiment_id=exp.id)
    ext = exp.evaluation.feature_extractor
    ms = exp.evaluation.metrics
    # KID first: unbiased at any sample size, where a Fréchet distance from fewer samples than
    # feature dimensions is not estimable (the notes under the table say when that is the case).
    names = [metric_name("kid", ext), metric_name("fd", ext), "precision", "recall",
             *(m for m in ("class_agreement", "clip_score", "clip_drift") if m in ms)]
    cols = [(metric_spec(name).title, name) for name in names]  # titles from the metric registry
    tb_sizes = list(exp.evaluation.timing_batch_sizes)
    head = ["variation", "seeds"] + [c for c, _ in cols] + [f"s/img b{b}" for b in tb_sizes] + [
        "UNet calls/enc/dec", "GFLOPs/img", "peak MB", "σ²_Δ mean"]
    rows = []
    for v in exp.variations:
        m = metrics.filter(pl.col("variation_id") == v.id) if metrics.height else metrics
        if m.height == 0:
            rows.append([v.id, "0"] + ["–"] * (len(head) - 2))
            continue
        seeds = sorted(set(m["seed"].to_list()))
        row = [v.id, str(len(seeds))]
        for _, name in cols:
            row.append(_ci_text(m.filter(pl.col("metric") == name)["value"].to_list()))
        t = timings.filter(pl.col("variation_id") == v.id) if timings.height else timings
        for b in tb_sizes:
            src = rounds.filter(pl.col("variation_id") == v.id) if rounds.height else t
            tb = src.filter(pl.col("batch_size") == b) if src.height else src
            row.append(_ci_text(tb["sec_per_image"].to_list()) if tb.height else "–")
        t1 = t.filter(pl.col("batch_size") == min(exp.evaluation.timing_batch_sizes)) if t.height else t
        if t1.height:
            r0 = t1.row(0, named=True)
            full = r0["encoder_forwards"]
            row.append(f"{r0['unet_calls']}/{full}/{r0['decoder_forwards']}")
            row.append(f"{r0['flops_per_image'] / 1e9:.2f}" if r0["flops_per_image"] else "–")
            row.append(f"{r0['peak_memory_bytes'] / 2**20:.0f}" if r0["peak_memory_bytes"] else "–")
        else:
            row += ["–", "–", "–"]
        f = fstats.filter((pl.col("variation_id") == v.id) & (pl.col("block") == "all")) if fstats.height else fstats
        if f.height:
            per_seed = f.group_by("seed").agg(pl.col("variance").mean())["variance"].to_list()
            row.append(_ci_text(per_seed))
        else:
            row.append("–")
        rows.append(row)
    return markdown_table(head, rows)


def _timing_note(store: ResultsStore, exp: Experiment) -> str:
    rounds = store.timing_rounds(exp.id)
    if rounds.height:
        return (f"s/img: the interleaved timing session, {rounds['round'].n_unique()} rounds (every sampler timed "
                "back to back in each round), mean ± 95% t half-width over rounds")
    return "s/img: device-synchronised after warm-up, per run"


def _table_notes(exp: Experiment, store: ResultsStore | None = None) -> str:
    """What produced the table's numbers, in one paragraph under it."""
    ev = exp.evaluation
    ref = exp.datasets.get(ev.reference) if ev.reference else None
    ref_text = ref.description or ref.id if ref else ("real Fashion-MNIST test images" if exp.embedded else "–")
    if ev.feature_extractor == "inception":
        q = f"FID/KID/precision/recall: clean-fid Inception features ({ev.inception_weights}) vs {ref_text}"
    else:
        q = (f"FD/KID/precision/recall: EfficientNet-Lite0 features ({ev.feature_extractor}, "
             f"{ev.feature_image_size}²) vs {ref_text} — not Inception FID")
    parts = [q]
    if "class_agreement" in ev.metrics:
        backbones = sorted({m.backbone for m in exp.models.values() if m.backbone})
        parts.append("class agr.: " + (", ".join(CLASSIFIERS[b] for b in backbones) or "–"))
    if "clip_score" in ev.metrics:
        parts.append(f"CLIPScore: torchmetrics with the local CLIP {ev.clip_model}")
    if "clip_drift" in ev.metrics:
        parts.append("CLIP drift: mean 1 − cos of CLIP image embeddings, cached sampler vs no cache on the same "
                     "weights, prompts and noise")
    parts.append(_timing_note(store, exp) if store is not None else "s/img: device-synchronised after warm-up")
    parts.append("peak MB: CUDA peak allocated on GPU, process RSS on CPU")
    return "; ".join(parts) + "."


def criteria_table(results) -> str:
    rows = []
    for r in results:
        verdict = getattr(r, "verdict", None) or {True: "PASS", False: "FAIL", None: "n/a"}[r.passed]
        value = "–" if r.value is None else f"{r.value:.4g}"
        lo, hi = getattr(r, "ci_low", None), getattr(r, "ci_high", None)
        if r.value is not None and lo is not None and hi is not None:
            value += f" [{lo:.3g}, {hi:.3g}]"
        note = r.details.get("reason", "") if isinstance(r.details, dict) else ""
        if not note and isinstance(r.details, dict):
            b, c = r.details.get("baseline_variation"), r.details.get("candidate_variation")
            note = f"{c} vs {b}" if b and c else ", ".join(r.details.get("variations", []) or [])
        rows.append([r.criterion, verdict, value, f"{r.threshold:g}", note])
    return markdown_table(["criterion", "verdict", "value [95% CI]", "threshold", "note"], rows)


def stored_weights(store: ResultsStore, exp: Experiment) -> list[RunWeights]:
    """Which weights each finished run of ``exp`` (its variations and seeds) sampled, read from the
    runs' stored configs: the fine-tune's key, or ``base:<model>`` — the rows
    :func:`~fcr_eval.analysis.replication.contrast_replication` reads, as the plan gives them."""
    import json

    runs = store.runs(experiment_id=exp.id)
    variations, seeds = {v.id for v in exp.variations}, set(exp.seeds)
    out = []
    for r in runs.iter_rows(named=True) if runs.height else ():
        if r["variation_id"] not in variations or r["seed"] not in seeds or r.get("status", "finished") != "finished":
            continue
        config = json.loads(r["config"]) if isinstance(r["config"], str) else (r["config"] or {})
        ft = config.get("finetune")
        model = (config.get("variation") or {}).get("model", r["model"])
        out.append(RunWeights(r["variation_id"], int(r["seed"]), ft["key"] if ft else f"base:{model}", ft is not None))
    return out


@dataclass
class Report:
    """What :func:`report` printed and wrote: the tables, the plots, and the verdicts it computed
    (contrasts and criteria; kept in the store by ``fcr-eval run``, never by the report)."""

    store: Path
    plots: list[Path] = field(default_factory=list)
    table: str = ""
    criteria: list = field(default_factory=list)
    contrasts: list = field(default_factory=list)


def report(exp: Experiment, store_path: Path, *, plots: bool = True) -> Report:
    """Print the paired table, the contrasts, the summary table and the success criteria, and
    write the plots (PNG files next to the store); the store is opened read-only."""
    from fcr_eval.report.board import evaluate_store_criteria

    store = ResultsStore.open_readonly(store_path)
    title = f"{exp.id}{f' (profile {exp.profile})' if exp.profile else ''}"
    per_sample = store.sample_metrics(experiment_id=exp.id)
    paired = paired_table(exp, per_sample)
    if paired:
        print(f"\n## {title}: paired per-sample metrics, mean [95% CI, bootstrap over samples clustered by seed]\n")
        print(paired)
        print("\n" + _paired_notes())
    weights = stored_weights(store, exp) if exp.contrasts or exp.criteria is not None else []
    replication = {c.id: contrast_replication(weights, c.variations) for c in exp.contrasts}
    contrasts, contrast_results = contrasts_report(exp, per_sample, replication)
    if contrasts:
        print(f"\n### contrasts (paired over samples sharing seed and x_T; [[contrasts]] of {exp.path})\n")
        print(contrasts)
        print("\n" + _contrast_notes(replication))
    table = summary_table(exp, store)
    spread = ("mean (the two seeds' values)" if len(exp.seeds) == 2 else "mean ± 95% t-interval half-width over seeds")
    print(f"\n## {title}: set-level metrics, {spread}\n")
    print(table)
    print("\n" + _table_notes(exp, store) + _set_size_note(exp, store))
    crit = []
    if exp.criteria is not None:
        crit = evaluate_store_criteria(store, exp.id, exp.criteria,
                                       replication=lambda sides: contrast_replication(weights, sides))
        print("\n### success criteria (design.md §1)\n")
        print(criteria_table(crit))
        print("\n" + _verdict_count_note(exp, crit))
    print(f"\nstore: {store_path}")
    files = write_plots(exp, store_path) if plots else []
    return Report(store=store_path, plots=files, table=table, criteria=crit, contrasts=contrast_results)


def write_plots(exp: Experiment, store_path: Path) -> list[Path]:
    """Draw the experiment's plots from the store (PNG files in ``plots/<experiment>/`` next to it)
    and print where they went. The contrast plots read the *stored* contrasts: after a run, draw
    them once its verdicts are kept (``fcr-eval run`` does), or they show the previous ones."""
    from fcr_eval.report.attribution import attribution_plots
    from fcr_eval.report.plots import make_plots

    store = ResultsStore.open_readonly(store_path)
    plot_dir = safe_child(store.root, "plots", exp.id)
    files = make_plots(exp, store, plot_dir)
    files += attribution_plots(exp, store, plot_dir)
    if files:
        print(f"plots ({store.root / 'plots' / exp.id}):")
        for f in files:
            print(f"  {f}")
    return files
