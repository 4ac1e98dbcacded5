"""Why consistent encoder features leave FD's cache error in place: the attribution, measured.

    nice -n 10 uv run python benchmarks/mechanism_study.py \\
        --finetunes results/runs/mini-exp-1-decide/finetune          # -> runs/bench/mechanism-<time>/
    uv run python benchmarks/mechanism_study.py --experiment experiments/mini-exp-1-oc.toml \\
        --finetunes results/runs/mini-exp-1-oc/finetune --per-arm 5 --out docs/mechanism
    uv run python benchmarks/mechanism_study.py --experiment experiments/mini-exp-1-rollout.toml \\
        --finetunes results/runs/mini-exp-1-rollout/finetune --arms control,rollout --cache deepcache \\
        --per-arm 5 --out results/mechanism-rollout-dc

Results go to a fresh ``runs/bench/mechanism-<UTC time>/`` unless ``--out`` names a folder; the
committed ``docs/mechanism/`` is rewritten only when passed as ``--out`` (the script names the files
it replaces). Every argument is checked before a model loads: ranges, ``--samples`` against the
experiment's samples per run, ``--stride`` against its steps, each arm asked for against the
finished fine-tunes found, each fine-tune's weights folder (``config.json`` and safetensors header
readable, the base model's architecture).

Runs ``fcr_sample.attribute_cache_error`` (FD-10 on DDIM-20 + CFG 2.0, mini-exp-1's sampling,
propagation on; ``--cache deepcache``: DeepCache-N``--stride``, cut 0) on the embedded base weights and on every finished fine-tune under
``--finetunes`` it recognises (read-only: the folders' ``fcr_eval_weights.json`` name
``final_unet``; :data:`ARMS` maps a folder name to its arm: the λ = 0 control, the literal FCR term,
sampler-scale FCR λ = 0.15, output consistency λ_OC = 0.25, the rollout objective at any λ and k:
``rollout`` for DeepCache's segment, ``rollout_fd`` for FD's), each on its own seed's x_T and prompts
(the first ``--samples`` of the run's). ``--resume --arms literal --finetunes <other folder>`` adds
an arm from another experiment's fine-tunes to the same tables. Per weights it also samples the
whole cached run and the uncached one from the same x_T, so the final error with every step served
can be set against the one-step propagations (compounding), and the first served segment's own
error on the sampler's trajectory (what the rollout objective trains): the relative error of the
predicted x0 and of the state at its last step (``segment_x0_error``, ``segment_state_error``).

``--out`` must be a fresh folder (or one this study wrote, with ``--resume``): the committed
results in docs/mechanism/ are never overwritten by accident; move what you mean to commit.

Per arm it reports t-intervals over fine-tunes (``fcr_eval.analysis.stats.mean_ci`` of the
per-fine-tune values) and, FCR and output consistency against the control, a paired t-interval over
the seeds both arms have (one fine-tune of each arm per seed, same x_T). Writes ``results.json``, ``tables.md`` and
one ``attribution_<arm>.png`` per arm (``fcr_eval.report.attribution.plot_cache_attribution``).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import math
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_cli import UserError, output_folder, parser, run, weights_architecture  # noqa: E402  (same folder)
from fcr_common.cli_errors import int_at_least  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = ROOT / "experiments" / "mini-exp-1-decide.toml"
#: A fine-tune folder's objective part (``ft-<this>-s<seed>-<hash>``, fcr_eval.plan.planner) → arm.
ARMS = {"lam0.00-d10-all": "control", "lam0.15-d10-ss-relative_mse-all": "fcr",
        "oc0.25-d10-ss-relative_mse-fd": "oc", "lam0.10-d10-all": "literal"}
#: Rollout fine-tunes (``ro<λ>-k<k>-<cache>-<target>…``, any λ and k) by the cache they train.
ROLLOUT_ARMS = {"deepcache": "rollout", "fd": "rollout_fd"}
ARM_ORDER = ("base", "control", "literal", "fcr", "oc", "rollout", "rollout_fd")
ARM_NAMES = {"base": "base weights", "control": "λ = 0 control fine-tunes", "fcr": "sampler-scale FCR λ = 0.15",
             "oc": "output consistency λ_OC = 0.25", "literal": "literal FCR λ = 0.1 (timesteps, MSE)",
             "rollout": "rollout objective (DeepCache's segment)", "rollout_fd": "rollout objective (FD's segment)"}


def arm_of(objective: str) -> str | None:
    """The arm of a fine-tune folder's objective part, or ``None`` for one the study does not know."""
    if objective in ARMS:
        return ARMS[objective]
    m = re.fullmatch(r"ro[0-9.]+-k\d+-(deepcache|fd)-.+", objective)
    return ROLLOUT_ARMS[m.group(1)] if m else None
logger = logging.getLogger("mechanism_study")


def finished_finetunes(folder: Path) -> list[tuple[str, int, Path]]:
    """``(arm, seed, final_unet)`` of every finished fine-tune under ``folder`` (read-only)."""
    out = []
    for d in sorted(folder.glob("ft-*")):
        info = d / "fcr_eval_weights.json"
        m = re.fullmatch(r"ft-(.+)-s(\d+)-[0-9a-f]+", d.name)
        if not info.is_file() or m is None or arm_of(m.group(1)) is None:
            continue
        try:
            record = json.loads(info.read_text())
            unet = d / "checkpoints" / Path(record["final_unet"]).relative_to(Path(record["run_dir"]) / "checkpoints")
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{info} does not name the fine-tune's weights ({type(e).__name__}: {e}); the fine-tune "
                            "did not finish cleanly: rerun it (fcr-eval run resumes it) or move the folder aside") from None
        out.append((arm_of(m.group(1)), int(m.group(2)), unet))  # its weights are checked when chosen
    return out


def _rel(a, ref) -> float:
    return float((a - ref).double().pow(2).sum() / ref.double().pow(2).sum())


def measure(ctx, exp, unet, seed: int, n: int, cache, propagation: bool) -> tuple[list, dict]:
    """Attribution rows, and the real cached run against the uncached one from the same x_T, for one
    weights and seed: the final error, the first served segment's x0 and state errors, and the
    samples measured."""
    import torch
    from fcr_eval.run.schedulers import make_sampling_scheduler
    from fcr_sample import (
        DeepCacheConfig,
        apply_deep_cache,
        apply_encoder_cache,
        attribute_cache_error,
        denoise,
        remove_deep_cache,
        remove_encoder_cache,
    )

    s = exp.sampling
    prompts = ctx.prompts(s.eval_prompts, s.n_samples)
    x_T = ctx.initial_noise(s.n_samples, ctx.sampling_resolution(), seed)[:n]  # the run's first n
    assert x_T.shape[0] == n, (x_T.shape, n)  # main() refuses --samples past the run's samples
    cond, null = ctx.encode(prompts, slice(0, n))
    sched = make_sampling_scheduler(s.scheduler, ctx.scheduler_config())
    res = attribute_cache_error(unet, sched, x_T, cond, null, cache=cache, steps=s.num_inference_steps,
                                guidance_scale=s.guidance_scale, propagation=propagation)
    deep = isinstance(cache, DeepCacheConfig)
    trajectories = {}
    with torch.no_grad():
        for name in ("fresh", "cached"):
            seen = []
            record = lambda info, seen=seen: seen.append((info["x"], info["denoised"]))  # noqa: E731
            if name == "cached":
                (apply_deep_cache if deep else apply_encoder_cache)(unet, cache)
            try:
                final = denoise(unet, sched, x_T, cond, null, steps=s.num_inference_steps,
                                guidance_scale=s.guidance_scale, callback=record)
            finally:
                if name == "cached":
                    (remove_deep_cache if deep else remove_encoder_cache)(unet)
            trajectories[name] = (final, seen)
    keys = res.key_steps
    last = (keys[1] if len(keys) > 1 else s.num_inference_steps) - 1  # the first served segment's last step
    (fresh, f_steps), (cached, c_steps) = trajectories["fresh"], trajectories["cached"]
    return res.to_rows(), {"full_final_error": _rel(cached, fresh), "segment_last_step": last,
                           "segment_x0_error": _rel(c_steps[last][1], f_steps[last][1]),
                           "segment_state_error": _rel(c_steps[last][0], f_steps[last][0]),
                           "samples": int(x_T.shape[0])}


def per_weights(rows, run: dict) -> dict:
    """The scalars the verdicts compare, for one weights (``run``: :func:`measure`'s second value)."""
    import numpy as np
    import polars as pl
    from fcr_eval.analysis.attribution import compounding, feature_summary, step_summary

    full_error = run["full_final_error"]
    steps = step_summary(rows)
    feats = feature_summary(rows)
    first = steps.filter(pl.col("step") <= run["segment_last_step"])
    out = {"eps_error": float(steps["eps_error"].mean()), "relative_change": float(steps["relative_change"].mean()),
           **run}
    if "x0_error" in steps.columns:  # one-step x0 error on the uncached trajectory, first segment
        out["x0_error_first_segment"] = float(first["x0_error"].mean())
    out["gain"] = out["eps_error"] / out["relative_change"]
    for r in feats.iter_rows(named=True):
        for q in ("relative_change", "only_stale_error", "gain", "share"):
            out[f"{r['feature']}:{q}"] = r[q]
    if "final_error" in steps.columns:
        e = steps["final_error"].to_numpy()
        out["sum_final"] = float(e.sum())
        out.update({f"final_share:{int(s)}": float(v) for s, v in zip(steps["step"], steps["final_share"],
                                                                        strict=True)})
        out.update({f"final:{int(s)}": float(v) for s, v in zip(steps["step"], e, strict=True)})
        out.update({f"comp:{k}": v for k, v in compounding(float(e.sum()), float(np.sqrt(e).sum()),
                                                           full_error).items()})
    return out


def _ci(vals: list[float]) -> str:
    from fcr_eval.analysis.stats import mean_ci

    vals = [v for v in vals if v is not None and math.isfinite(v)]
    if not vals:
        return "–"
    if len(vals) == 1:
        return f"{vals[0]:.4g} (n=1)"
    c = mean_ci(vals)
    return f"{c.mean:.4g} [{c.low:.4g}, {c.high:.4g}] (n={c.n})"


def tables(summary: dict[str, dict[int, dict]], features: list[str], steps: list[int]) -> str:
    arms = [a for a in ARM_ORDER if summary.get(a)]
    lines = ["## Per arm: mean [95 % t-interval over fine-tunes]\n",
             "| quantity | " + " | ".join(arms) + " |", "|---|" + "---:|" * len(arms)]

    def row(label, key):
        lines.append(f"| {label} | " + " | ".join(_ci([w.get(key) for w in summary[a].values()]) for a in arms) + " |")

    row("one-step ε error, all stale (mean over steps)", "eps_error")
    row("feature change σ²_Δ/energy, all (mean over steps)", "relative_change")
    row("gain = error / change", "gain")
    row("final error, every step cached", "full_final_error")
    row("first segment: one-step x0 error (mean over its steps)", "x0_error_first_segment")
    row("first segment: x0 error at its last step, cached run", "segment_x0_error")
    row("first segment: state error after it, cached run", "segment_state_error")
    row("Σ final error, one step cached at a time", "sum_final")
    row("final / Σ one-step (1 = independent)", "comp:vs_independent")
    row("final / (Σ √one-step)² (1 = aligned)", "comp:vs_aligned")
    lines += ["\n## Per feature (mean over served steps)\n",
              "| feature | quantity | " + " | ".join(arms) + " |", "|---|---|" + "---:|" * len(arms)]
    for f in features:
        for q, label in (("relative_change", "change"), ("only_stale_error", "error, only it stale"),
                         ("gain", "gain"), ("share", "share of only-stale error")):
            lines.append(f"| {f} | {label} | " + " | ".join(_ci([w.get(f"{f}:{q}") for w in summary[a].values()])
                                                         for a in arms) + " |")
    lines += ["\n## Propagation per step: final error when only step i is cached (share of Σ)\n",
              "| step | " + " | ".join(arms) + " |", "|---:|" + "---:|" * len(arms)]
    for s in steps:
        lines.append(f"| {s} | " + " | ".join(_ci([w.get(f"final_share:{s}") for w in summary[a].values()])
                                               for a in arms) + " |")
    return "\n".join(lines)


def paired(summary: dict[str, dict[int, dict]], keys: list[str], arm: str = "fcr") -> str:
    """``arm`` − control, paired by seed (the same x_T; one fine-tune of each arm per seed)."""
    import numpy as np
    from fcr_eval.analysis.stats import paired_t_test

    name = arm.upper()
    seeds = sorted(set(summary.get("control", {})) & set(summary.get(arm, {})))
    if len(seeds) < 2:
        return f"(paired {name} − control needs ≥ 2 seeds with both fine-tunes; have {len(seeds)})"
    lines = [f"## {name} − control, paired over seeds {seeds} (95 % t-interval)\n",
             f"| quantity | {name} / control (mean ratio) | {name} − control [95 % CI] | p |",
             "|---|---:|---:|---:|"]
    for k in keys:
        a = [summary[arm][s].get(k) for s in seeds]
        b = [summary["control"][s].get(k) for s in seeds]
        if any(v is None or not math.isfinite(v) for v in a + b):
            continue
        t = paired_t_test(a, b)
        ratio = float(np.mean(np.array(a) / np.array(b)))
        lines.append(f"| {k} | {ratio:.3g} | {t.mean_diff:.4g} [{t.low:.4g}, {t.high:.4g}] | {t.p_value:.3g} |")
    return "\n".join(lines)


def _save_rows(out: Path, frames: dict, summary: dict, walls: dict) -> None:
    import polars as pl

    out.mkdir(parents=True, exist_ok=True)
    rows = pl.concat([f.with_columns(arm=pl.lit(arm), seed=pl.lit(int(f["run"][0].rsplit("-s", 1)[1])))
                      for arm, fs in frames.items() for f in fs])
    rows.write_csv(out / "rows.csv")
    (out / "results.json").write_text(json.dumps({"meta": {"weights_wall_s": walls}, "per_weights": summary},
                                                 indent=1, default=float))


#: The files a study writes into its folder (besides one attribution_<arm>.png per arm).
WRITES = ("rows.csv", "results.json", "tables.md", *(f"attribution_{arm}.png" for arm in ARM_ORDER))


def _finetune_problem(folder: Path) -> str | None:
    """Why a finished fine-tune's weights cannot be measured, or ``None``."""
    try:
        weights_architecture(folder)
    except UserError as e:
        return str(e)
    return None


def _check_arguments(a, exp) -> tuple[list[tuple[str, int, Path | None]], list[str]]:
    """Everything the study needs, checked before a model loads: (the weights to measure, arms)."""
    s = exp.sampling
    if a.samples > s.n_samples:
        raise UserError(f"--samples {a.samples} is more than the {s.n_samples} samples per run of {a.experiment} "
                        f"(sampling.n_samples); the study measures the runs' own x_T and prompts: pass at most "
                        f"{s.n_samples}")
    if a.stride > s.num_inference_steps:
        raise UserError(f"--stride {a.stride} is larger than the experiment's {s.num_inference_steps} sampling steps "
                        f"(the same run as a stride of {s.num_inference_steps}); pass at most {s.num_inference_steps}")
    if not a.finetunes.is_dir():
        raise UserError(f"--finetunes {a.finetunes} is not a folder; pass an experiment's finetune folder "
                        "(results/runs/<experiment>/finetune)")
    arms = [x.strip() for x in a.arms.split(",") if x.strip()]
    if unknown := sorted(set(arms) - set(ARM_ORDER)):
        raise UserError(f"--arms: unknown {unknown}; use {', '.join(ARM_ORDER)}")
    found = finished_finetunes(a.finetunes)
    # the base weights on the same seeds as the fine-tunes (its interval holds sampling noise only)
    chosen = [("base", seed, None) for seed in exp.seeds[: a.per_arm]] if "base" in arms else []
    for arm in (x for x in ARM_ORDER[1:] if x in arms):
        mine = sorted((f for f in found if f[0] == arm), key=lambda f: f[1])[: a.per_arm]
        if not mine and not a.resume:
            have = sorted({f[0] for f in found})
            raise UserError(f"--arms {arm}: no finished fine-tune of that arm under {a.finetunes} (found: "
                            f"{', '.join(have) or 'none'}). Leave it out of --arms or point --finetunes at its "
                            "experiment's fine-tunes")
        chosen += mine
    for arm, seed, path in chosen:
        if path is not None and (problem := _finetune_problem(path)):
            raise UserError(f"fine-tune {arm} seed {seed}: {problem}")
    shapes = {weights_architecture(path)[1] for _, _, path in chosen if path is not None}
    if len(shapes) > 1:
        raise UserError(f"the fine-tunes under {a.finetunes} are UNets of {len(shapes)} architectures; the study "
                        "compares weights of one model. Point --finetunes at one experiment's fine-tunes")
    return chosen, arms


def main(argv=None) -> int:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--experiment", type=Path, default=EXPERIMENT,
                   help="the experiment file whose sampling (and fine-tunes) the study reads")
    p.add_argument("--finetunes", type=Path,
                   default=Path("results/runs/mini-exp-1-decide/finetune"))
    p.add_argument("--samples", type=int_at_least(1), default=32,
                   help="samples per weights: the first N of each run (at most the experiment's n_samples)")
    p.add_argument("--per-arm", type=int_at_least(1), default=3,
                   help="at most this many fine-tunes per arm (lowest seeds)")
    p.add_argument("--stride", type=int_at_least(2), default=10,
                   help="FD's stride / DeepCache's interval (at most the experiment's steps)")
    p.add_argument("--cache", choices=("fd", "deepcache"), default="fd",
                   help="the cache attributed: FD-<stride> or DeepCache-N<stride> (cut 0) [%(default)s]")
    p.add_argument("--no-propagation", action="store_true")
    p.add_argument("--resume", action="store_true",
                   help="keep the weights already measured in --out (rows.csv, results.json) and add the rest")
    p.add_argument("--arms", default="base,control,fcr,oc", help=f"which arms to measure ({', '.join(ARM_ORDER)}; "
                   "each needs finished fine-tunes in --finetunes)")
    p.add_argument("--threads", type=int_at_least(1), default=2)
    p.add_argument("--out", type=Path, default=None,
                   help="results folder (default: a new runs/bench/mechanism-<time>; docs/mechanism only when named)")
    a = p.parse_args(argv)
    from fcr_eval.spec.experiment import load_experiment

    exp = load_experiment(a.experiment)
    chosen, _ = _check_arguments(a, exp)
    if a.resume and (a.out is None or not (a.out / "rows.csv").is_file() or not (a.out / "results.json").is_file()):
        raise UserError("--resume continues a study in --out: pass the --out folder of the study to continue (it "
                        "holds rows.csv and results.json)")
    out = output_folder(a.out, "mechanism", WRITES)
    return _study(a, exp, chosen, out, argv)


def _study(a, exp, chosen, out: Path, argv) -> int:
    import polars as pl
    import torch
    from fcr_common.provenance import code_version
    from fcr_eval.report.attribution import plot_cache_attribution
    from fcr_eval.run.contexts import make_context
    from fcr_sample import DeepCacheConfig, EncoderCacheConfig

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logger.setLevel(logging.INFO)
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    # the study needs the model, prompts and x_T only: no quality reference worth extracting
    exp = dataclasses.replace(exp, evaluation=dataclasses.replace(exp.evaluation, metrics=(), n_reference=2,
                                                                 feature_image_size=32))
    tmp = Path(tempfile.mkdtemp(prefix="mechanism-"))
    ctx = make_context(exp, tmp, torch.device("cpu"))
    cache = EncoderCacheConfig(stride=a.stride) if a.cache == "fd" else DeepCacheConfig(cache_interval=a.stride)
    frames, summary, walls = {}, {}, {}
    if a.resume:
        old = pl.read_csv(out / "rows.csv")
        prev = json.loads((out / "results.json").read_text())
        walls = {k: float(v) for k, v in prev["meta"].get("weights_wall_s", {}).items()}
        for (arm, seed), f in old.group_by("arm", "seed", maintain_order=True):
            frames.setdefault(arm, []).append(f.drop("arm", "seed"))
            summary.setdefault(arm, {})[int(seed)] = prev["per_weights"][arm][str(seed)]
        chosen = [c for c in chosen if int(c[1]) not in summary.get(c[0], {})]
    logger.info("weights to measure: %s", [(arm, s) for arm, s, _ in chosen])
    for arm, seed, path in chosen:
        t = time.perf_counter()
        unet = ctx.unet(path)
        rows, run = measure(ctx, exp, unet, seed, a.samples, cache, not a.no_propagation)
        f = pl.DataFrame(rows).with_columns(run=pl.lit(f"{arm}-s{seed}"))
        frames.setdefault(arm, []).append(f)
        summary.setdefault(arm, {})[seed] = per_weights(f, run)
        walls[f"{arm}-s{seed}"] = round(time.perf_counter() - t, 1)
        logger.info("%s s%d: %.1f s, one-step ε error %.4g, full final error %.4g, first segment's x0 error %.4g",
                    arm, seed, walls[f"{arm}-s{seed}"], summary[arm][seed]["eps_error"], run["full_final_error"],
                    run["segment_x0_error"])
        # after every weights: an interrupted study keeps what it measured (--resume)
        _save_rows(out, frames, summary, walls)
    all_rows = pl.concat([f for fs in frames.values() for f in fs])
    features = list(dict.fromkeys(all_rows.filter(pl.col("feature") != "all")["feature"].to_list()))
    steps = sorted(set(all_rows["step"].to_list()))
    pngs = [str(plot_cache_attribution(pl.concat(fs), out / f"attribution_{arm}.png",
                                       f"{cache.label}, DDIM-{exp.sampling.num_inference_steps}, "
                                       f"CFG {exp.sampling.guidance_scale:g}: {ARM_NAMES[arm]} "
                                       f"({len(fs)} weights × {a.samples} samples)").name)
            for arm, fs in frames.items()]
    keys = ["eps_error", "relative_change", "gain", "full_final_error", "sum_final", "x0_error_first_segment",
            "segment_x0_error", "segment_state_error", "comp:vs_independent", "comp:vs_aligned"] + \
        [f"{f}:{q}" for f in features for q in ("relative_change", "only_stale_error", "gain")]
    wall = time.perf_counter() - t0
    text = "\n\n".join([tables(summary, features, steps),
                         *(paired(summary, keys, arm) for arm in ARM_ORDER[3:] if summary.get(arm))])
    meta = {"command": " ".join(["python", "benchmarks/mechanism_study.py", *(argv or sys.argv[1:])]),
            "wall_s": round(wall, 1), "date": _dt.date.today().isoformat(), "code_version": code_version(),
            "machine": f"{platform.machine()} CPU, torch threads {a.threads}, {platform.python_version()}",
            "weights": [(arm, s, str(p) if p else "base") for arm, s, p in chosen],
            # what each weights was measured on (x_T of the run's first samples), read back, not the flag
            "samples": sorted({w.get("samples") for ws in summary.values() for w in ws.values()}, key=str),
            "cache": cache.label, "plots": pngs, "weights_wall_s": walls,
            "measured": {arm: sorted(summary[arm]) for arm in summary}}
    (out / "tables.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps({"meta": meta, "per_weights": summary}, indent=1, default=float))
    print(text)
    print(f"\nwall {wall:.0f} s; wrote {out}/tables.md, results.json, {', '.join(pngs)}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
