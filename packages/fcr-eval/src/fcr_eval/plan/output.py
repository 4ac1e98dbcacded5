"""A plan as people read it: the text table ``fcr-eval plan`` prints (fine-tunes, runs with their
forward counts, FLOPs and wall time, what each contrast's interval will hold, totals) and the
design's JSON form (``--json``).

Example::

    print(format_plan(plan))
    json.dumps(plan_json([plan]))
"""

from __future__ import annotations

from fcr_eval.plan.costs import ASSUMED_GPU_TFLOPS
from fcr_eval.plan.planner import LONG_PLAN_SECONDS, Plan
from fcr_eval.plan.resources import (
    DEFAULT_GPUS,
    PlanResources,
    fmt_bytes,
    format_projection,
    format_resources,
    plan_resources,
)
from fcr_eval.spec.experiment import VariationSpec
from fcr_eval.spec.vocabulary import INDEPENDENT_FINETUNES, SHARED_FINETUNE

__all__ = ["format_plan", "plan_json", "long_plan_line"]


def long_plan_line(plan: Plan) -> str | None:
    """The plan's first line when its wall-time estimate is past a week on this machine, else ``None``."""
    if plan.total_seconds <= LONG_PLAN_SECONDS:
        return None
    gpu = ""
    if not plan.experiment.embedded:
        gpu = (f"; on one A100-class GPU at an assumed {ASSUMED_GPU_TFLOPS:g} TFLOP/s ≈"
               f"{_fmt_s(plan.total_flops / (ASSUMED_GPU_TFLOPS * 1e12))}")
    return (f"WARNING: experiment {plan.experiment.id} is estimated at ≈{_fmt_s(plan.total_seconds)} of compute on "
            f"this machine (at {plan.gflops_per_s:.1f} GFLOP/s, {plan.calibration}), far past a week{gpu}. Check n_samples, seeds and "
            "finetune.steps, or use a smaller profile")


def _fmt_flops(x: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if x >= scale:
            return f"{x / scale:.1f} {unit}"
    return f"{x / 1e6:.1f} MFLOP"


def _fmt_s(s: float) -> str:
    if s >= 365 * 86400:
        return f"{s / (365 * 86400):.1f} years"
    if s >= 86400:
        return f"{s / 86400:.1f} d"
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    if s >= 60:
        return f"{s / 60:.1f} min"
    return f"{s:.0f} s"


def _lambda_column(v: VariationSpec) -> str:
    """The plan table's λ column: FCR's λ, ``oc`` / ``ro`` + λ for output consistency / rollout, ``-`` for none."""
    if v.lambda_rollout is not None:
        return f"ro{v.lambda_rollout:g}"
    if v.lambda_oc is not None:
        return f"oc{v.lambda_oc:g}"
    return "-" if v.lambda_fcr is None else f"{v.lambda_fcr:g}"


def format_plan(plan: Plan, done: set[str] | None = None, *, resources: PlanResources | None = None,
                gpus: tuple[int, ...] | None = None) -> str:
    """The plan as text: fine-tunes, runs with forward counts, compute, peak RAM per process and
    disk, and totals; for a real model (or when ``gpus`` is given) the projection on ``gpus``
    GPUs (default :data:`~fcr_eval.plan.resources.DEFAULT_GPUS`)."""
    exp = plan.experiment
    done = done or set()
    res = resources or plan_resources(plan)
    lines = [line for line in (long_plan_line(plan),) if line]
    lines += [f"experiment {exp.id}" + (f" (profile {exp.profile})" if exp.profile else "") + f" — {exp.path}",
              f"  {exp.description}".rstrip()]
    lines += [f"  warning: {w}" for w in plan.warnings]
    lines.append("")
    lines.append(f"fine-tunes ({len(plan.finetunes)}, shared by the variations listed):")
    if not plan.finetunes:
        lines.append("  none")
    for f in plan.finetunes.values():
        what = f.label if f.objective != "fcr" else f"{f.label} blocks={f.blocks}"
        lines.append(f"  {f.key}: {f.model} {what} Δmax={f.delta_max} "
                     f"{f.steps} steps × batch {f.batch_size}, ≈{_fmt_flops(f.est_flops)}, ≈{_fmt_s(f.est_seconds)}")
        lines.append(f"      used by {', '.join(f.variations)}; folder {f.output_dir}")
    lines.append("")
    lines.append(f"runs ({len(plan.runs)} = {len(exp.variations)} variations × {len(exp.seeds)} seeds"
                 f"{f', {len(done)} already in the store' if done else ''}):")
    hdr = f"  {'variation':<26} {'seed':>4} {'model':<10} {'cache schedule':<16} {'λ':>5} {'robust':<14} " \
          f"{'steps':>5} {'imgs':>5} {'full/enc/dec/part fwd':>22} {'FLOPs':>11} {'time':>8} {'RAM/proc':>9} {'disk':>9}"
    lines.append(hdr)
    for r in plan.runs:
        v = r.variation
        fwd = f"{r.full_forwards}/{r.encoder_forwards}/{r.decoder_forwards}/{r.partial_forwards}"
        mark = " ✓" if r.run_id in done else ""
        lines.append(f"  {v.id:<26} {r.seed:>4} {v.model:<10} {r.sampler.label:<16} "
                     f"{_lambda_column(v):>5} {v.robustness:<14} {r.steps:>5} "
                     f"{r.n_samples:>5} {fwd:>22} {_fmt_flops(r.est_flops):>11} {_fmt_s(r.est_seconds):>8} "
                     f"{fmt_bytes(res.runs[r.run_id].peak_ram_bytes):>9} {fmt_bytes(res.runs[r.run_id].disk_bytes):>9}{mark}")
    lines.append("")
    lines.append("  forward counts are per sampling run (one batch); ×2 rows with classifier-free guidance; FLOPs "
                 "include the uncached reference a run samples for its paired metrics")
    if plan.replication:
        lines.append("contrasts (the noise each interval will hold):")
        for c in exp.contrasts:
            rep = plan.replication[c.id]
            note = {SHARED_FINETUNE: "sampling noise only; no PASS/FAIL about the method",
                    INDEPENDENT_FINETUNES: f"fine-tune + sampling noise over {len(exp.seeds)} fine-tunes",
                    }.get(rep, "sampling noise (no fine-tune varies)")
            lines.append(f"  {c.id}: {rep} — {note}")
    costs = ", ".join(f"{k}: {c.flops_per_forward / 1e9:.3g} GFLOPs/forward, encoder {c.encoder_share:.0%} "
                      f"({c.source})" for k, c in plan.costs.items())
    lines.append(f"  model cost: {costs}")
    lines.append(f"estimated compute: {_fmt_flops(plan.total_flops)} (sampling + fine-tuning); "
                 f"wall time ≈ {_fmt_s(plan.total_seconds)} at {plan.gflops_per_s:.1f} GFLOP/s ({plan.calibration};"
                 " includes timing repeats, feature extraction and σ²_Δ)")
    if not exp.embedded:
        lines.append(f"  on one A100-class GPU at an assumed {ASSUMED_GPU_TFLOPS:g} TFLOP/s effective: "
                     f"≈{_fmt_s(plan.total_flops / (ASSUMED_GPU_TFLOPS * 1e12))} (CPU figure above is for scale only)")
    lines += format_resources(res, plan_resources(plan, "sample" if res.reference_mode == "spill" else "spill"))
    if gpus or not exp.embedded:
        lines.append(format_projection(res.projection(gpus or DEFAULT_GPUS)))
    if exp.human_study:
        lines.append(f"human study: {exp.human_study.pairs} A/B pairs over {len(exp.human_study.comparisons)} "
                     "comparison(s) (run with fcr-human-study on the stored samples)")
    return "\n".join(lines)


def plan_json(plans: list[Plan]) -> dict:
    """The design's output form: experiments (experiment_id, run_variations, description),
    expected_models, expected_datasets."""
    experiments, models, datasets = [], [], []
    for plan in plans:
        exp = plan.experiment
        experiments.append({
            "experiment_id": exp.id,
            "run_variations": [v.id for v in exp.variations],
            "description": exp.description,
        })
        for m in exp.models.values():
            if m.source not in models:
                models.append(m.source)
        for d in exp.datasets.values():
            if d.id not in datasets:
                datasets.append(d.id)
    return {"experiments": experiments, "expected_models": models, "expected_datasets": datasets}
