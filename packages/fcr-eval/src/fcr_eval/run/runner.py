"""The experiment runner: plan → fine-tune → sample → evaluate → store, resumable.

:func:`run_experiment` executes every variation × seed of an :class:`~fcr_eval.spec.experiment.Experiment`:

1. plans the runs (:mod:`fcr_eval.plan.planner`): each run's settings are resolved once into typed
   objects (the sampler's fcr-sample config, the fine-tune it uses, its robustness protocol and
   prompts) and carried as a :class:`~fcr_eval.plan.planner.PlannedRun`; checks that every model can be
   loaded and every local file it needs is there (:mod:`fcr_eval.plan.validation`) before any work;
   the model family (embedded default or Stable Diffusion) is a :mod:`fcr_eval.run.contexts` context;
2. fine-tunes once per distinct fine-tune (:mod:`fcr_eval.run.finetuning`);
3. per run (:func:`execute_run`): samples with the run's sampler and scheduler under its
   robustness stress (:mod:`fcr_eval.run.sampling`), evaluates the samples
   (:mod:`fcr_eval.run.evaluation`), measures cost, σ²_Δ for the weights, the fine-tune compute;
4. writes the run to the store in one transaction with its config, extractor, code version and
   device. Finished runs are skipped, so an interrupted experiment resumes where it stopped;
   a run killed midway leaves only files in its own folder, never rows. A run that raises is
   recorded as failed (its traceback in ``<run folder>/error.txt``), the others go on, and the
   :class:`Outcome` is not ``ok``.

Under ``accelerate launch`` / ``torchrun`` every process samples and evaluates its shard of each
run's prompts (:mod:`fcr_eval.run.distributed`); the main process gathers, measures cost on its own
device and is the only one that writes the store.

It reports nothing: ``fcr-eval run`` prints the report (:mod:`fcr_eval.report.report`) from the
store when the runs are done.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from fcr_eval.plan.planner import PlannedRun, make_plan
from fcr_eval.plan.samplers import apply_sampler, remove_sampler
from fcr_eval.plan.validation import check_inputs, check_models
from fcr_eval.run.contexts import Prompts, RunContext, make_context
from fcr_eval.run.distributed import Processes
from fcr_eval.run.evaluation import (
    evaluate_shard,
    run_metrics,
    sample_metrics,
    save_samples,
    shard_prompts,
)
from fcr_eval.run.finetuning import finetune_fraction, run_finetune
from fcr_eval.run.sampling import (
    attack_initial_noise,
    measure_cost,
    new_scheduler,
    sample_prompts,
    uncached_reference,
)
from fcr_eval.spec.experiment import Experiment
from fcr_eval.store import (
    AttributionValue,
    FeatureStat,
    MetricRecord,
    ResultsStore,
    RunRecord,
    RunResult,
    writer_lock,
)

__all__ = ["RunnerOptions", "Outcome", "FailedRun", "run_experiment", "execute_run"]

logger = logging.getLogger(__name__)


@dataclass
class RunnerOptions:
    """Where to store, and how to run.

    Attributes:
        store: the DuckDB file; run folders and samples go next to it.
        threads: torch CPU threads (``None`` = torch's default).
        device: ``cpu`` / ``cuda`` (``None`` = CUDA when present).
        progress: tqdm bars.
        wait: when another runner holds the store: ``False`` refuses at once (naming it), seconds
            to wait for it, ``True`` to wait as long as it takes.
    """

    store: Path = Path("results/fcr.duckdb")
    threads: int | None = None
    device: str | None = None
    progress: bool = True
    wait: bool | float = False


@dataclass(frozen=True)
class FailedRun:
    """A run that raised: which, and the error's one-line form (the traceback is in ``run_dir``)."""

    run_id: str
    variation_id: str
    seed: int
    error: str
    run_dir: str


@dataclass
class Outcome:
    """What :func:`run_experiment` did. ``ok`` is false when any run failed; ``main`` says whether
    this is the process that wrote the store (the one that reports)."""

    store: Path
    wall_s: float = 0.0
    runs_done: int = 0
    runs_skipped: int = 0
    failed: list[FailedRun] = field(default_factory=list)
    main: bool = True

    @property
    def ok(self) -> bool:
        return not self.failed


# --------------------------------------------------------------------------------------------
# One run, as named steps
# --------------------------------------------------------------------------------------------


@dataclass
class _RunState:
    """What the steps of one run hand each other."""

    run: PlannedRun
    unet: torch.nn.Module
    weights_key: str
    prompts: Prompts
    x_T: torch.Tensor
    mine: range
    local: dict = field(default_factory=dict)
    images: torch.Tensor | None = None
    timings: list = field(default_factory=list)
    feature_stats: list[FeatureStat] = field(default_factory=list)
    attribution: list[AttributionValue] = field(default_factory=list)


def execute_run(ctx: RunContext, run: PlannedRun, exp: Experiment, store: ResultsStore | Path,
                finetunes: dict[str, dict], caches: dict, progress: bool = True,
                procs: Processes | None = None) -> RunResult | None:
    """Sample and evaluate one variation × seed; returns the store-ready :class:`RunResult` on the
    main process (``None`` on the others; nothing is written to the store here).

    With several processes each one samples and evaluates its shard of the prompts; the main
    process gathers the per-image results, measures cost on its own device and computes the
    metrics. ``store`` is the results store or, on processes that do not write, its folder (samples
    go under it). ``finetunes`` maps a fine-tune key to its finished summary. ``caches`` holds what
    runs share within one experiment (σ²_Δ per weights × seed, uncached reference samples)."""
    procs = procs or Processes()
    started = _dt.datetime.now(_dt.timezone.utc).replace(tzinfo=None)
    _write_run_config(run, procs)
    ft = finetunes[run.finetune.key] if run.finetune is not None else None
    st = _load_run(ctx, run, ft, procs)
    _feature_variance(ctx, st, caches, procs)
    _sample(ctx, st, procs, progress)
    _attribute(ctx, st, procs, progress)
    _evaluate(ctx, st, store, caches, procs, progress)
    parts = procs.gather(st.local)
    if not procs.is_main:
        return None
    return _run_result(ctx, st, ft, sorted(parts, key=lambda p: p["index"]), procs, started)


def _write_run_config(run: PlannedRun, procs: Processes) -> None:
    if procs.is_main:
        run_dir = Path(run.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps({"run_id": run.run_id, **run.config}, indent=2, default=str))


def _load_run(ctx: RunContext, run: PlannedRun, ft: dict | None, procs: Processes) -> _RunState:
    """The run's weights, prompts and initial noise (the same x_T per seed across variations: paired)."""
    weights = Path(ft["final_unet"]) if ft else None
    prompts = ctx.prompts(run.eval_prompts, run.n_samples, robustness=run.robustness)
    x_T = ctx.initial_noise(run.n_samples, run.resolution, run.seed)
    return _RunState(run=run, unet=ctx.unet(weights), weights_key=str(weights) if weights else "base",
                     prompts=prompts, x_T=x_T, mine=procs.shard(run.n_samples), local={"index": procs.index})


def _feature_variance(ctx: RunContext, st: _RunState, caches: dict, procs: Processes) -> None:
    """σ²_Δ depends on the weights and the seed only: computed once, before any cache is applied."""
    from fcr_eval.metrics.mechanism import encoder_feature_variance

    ev = ctx.exp.evaluation
    if "sigma2_delta" not in ev.metrics or not procs.is_main:
        return
    run = st.run
    key = ("sigma2", st.weights_key, run.seed, run.steps, run.sigma2_sampler_range)
    if key not in caches:
        z0, states = ctx.sigma2_inputs(ev.sigma2_samples, run.seed, ctx.sampling_resolution(), st.prompts.template)
        # the paper's literal range, Δ = 1…Δ_max DDPM timesteps (unchanged draws), then the range
        # the cache reuses features over, Δ = 1…stride sampler steps (its own seeded draws)
        rows = encoder_feature_variance(
            st.unet, z0, states, ctx.noise_scheduler, delta_max=ev.sigma2_delta_max,
            blocks=ev.sigma2_blocks, generator=torch.Generator().manual_seed(run.seed))
        if run.sigma2_sampler_range:
            rows += encoder_feature_variance(
                st.unet, z0, states, ctx.noise_scheduler, delta_max=run.sigma2_sampler_range,
                delta_unit="sampler_steps", sampler_steps=run.steps, blocks=ev.sigma2_blocks,
                generator=torch.Generator().manual_seed(run.seed + 7919))
        caches[key] = rows
    st.feature_stats = caches[key]


def _sample(ctx: RunContext, st: _RunState, procs: Processes, progress: bool) -> None:
    """Attack x_T (FGSM runs), sample the shard, and measure cost (main process), with the run's
    cache attached; the cache is removed again whatever happens."""
    run, ev = st.run, ctx.exp.evaluation
    bs = ctx.exp.sampling.batch_size
    scheduler = new_scheduler(ctx, run)
    apply_sampler(st.unet, run.sampler)
    try:
        if run.robustness.kind == "fgsm_latent":
            st.local["fgsm"] = attack_initial_noise(ctx, st.unet, scheduler, run, st.prompts, st.x_T, st.mine, bs,
                                                    progress)
        t0 = time.perf_counter()
        st.images = sample_prompts(ctx, st.unet, scheduler, st.prompts, st.x_T, st.mine, run.steps,
                                   run.guidance_scale, bs, desc=f"{run.variation.id} s{run.seed}", progress=progress)
        st.local["sample_s"] = time.perf_counter() - t0
        cost_metrics = ("sec_per_image", "flops", "peak_memory", "unet_forwards")
        timed_seed = ev.timing_seeds == "all" or run.seed == ctx.exp.seeds[0]
        if timed_seed and procs.is_main and any(m in ev.metrics for m in cost_metrics):
            st.timings = measure_cost(ctx, st.unet, scheduler, run, st.prompts, st.x_T,
                                      time_calls=not _session_times(ctx.exp, procs))
    finally:
        remove_sampler(st.unet, run.sampler)


def _attribute(ctx: RunContext, st: _RunState, procs: Processes, progress: bool) -> None:
    """Where the run's cache error enters (:func:`fcr_sample.attribute_cache_error`): on the
    run's own weights, x_T (the attacked one under FGSM) and prompts, its first
    ``attribution_samples`` samples as one batch, with its scheduler and guidance; the main
    process only, after sampling (no cache is attached then)."""
    run = st.run
    if run.attribution_samples < 1 or not procs.is_main:
        return
    from fcr_sample import attribute_cache_error

    k = run.attribution_samples
    cond, null = ctx.encode(st.prompts, slice(0, k))
    t0 = time.perf_counter()
    res = attribute_cache_error(
        st.unet, new_scheduler(ctx, run), st.x_T[:k].to(ctx.device), cond, null, cache=run.sampler.cache,
        steps=run.steps, guidance_scale=run.guidance_scale, propagation=run.attribution_propagation,
        progress=progress)
    st.attribution = AttributionValue.from_rows(res.to_rows(), k)
    logger.info("%s s%d: cache attribution over %d samples, %d served steps in %.1f s", run.variation.id,
                run.seed, k, len(res.steps), time.perf_counter() - t0)


def _evaluate(ctx: RunContext, st: _RunState, store: ResultsStore | Path, caches: dict, procs: Processes,
              progress: bool) -> None:
    """Per-image values of this shard, paired with the same weights' uncached samples from the
    run's own x_T (the attacked one under FGSM; an uncached run is its own reference), and the
    shard's PNGs."""
    run = st.run
    reference = uncached_reference(ctx, st.unet, run, st.prompts, st.x_T, st.mine, st.weights_key, caches,
                                   progress, images=None if run.sampler.cached else st.images)
    ref_features = None
    key = ("features", id(reference))  # the reference tensor lives in `caches` for the experiment
    extracts = ctx.reference is not None and ctx.extractor is not None and len(st.mine)
    own = reference is st.images  # an uncached run whose samples became the reference
    if extracts and key in caches:
        ref_features = caches[key][1]
    elif extracts and not own:
        caches[key] = (reference, ctx.extractor.extract(ctx.evaluation_images(reference)).features)
        ref_features = caches[key][1]
    # An uncached run is its own reference: evaluate_shard extracts its features once and they
    # serve as the reference features of the cached runs that follow.
    st.local.update(evaluate_shard(ctx, run, st.prompts, st.images, st.mine, reference, ref_features))
    if extracts and own and key not in caches and st.local.get("features") is not None:
        caches[key] = (reference, st.local["features"])
    st.local["samples"] = []
    saved = range(st.mine.start, min(st.mine.stop, run.save_samples))
    if len(saved):
        root = store.root if isinstance(store, ResultsStore) else Path(store).resolve()
        st.local["samples"] = save_samples(root, ctx.exp, run, st.prompts, st.images[: len(saved)], saved)
    if procs.is_main:
        ctx.save_grid(st.images, shard_prompts(st.prompts, st.mine), Path(run.run_dir) / "grid.png",
                      title=f"{ctx.exp.id} {run.variation.id} seed {run.seed}")


#: Variation fields that are columns of ``runs`` (or the effective schedule's columns).
_RUN_COLUMNS = ("id", "sampler", "stride", "parallel_decoding", "lambda_fcr", "lambda_oc", "delta_max", "blocks",
                "scheduler", "num_inference_steps", "guidance_scale", "resolution", "description")


def _run_result(ctx: RunContext, st: _RunState, ft: dict | None, parts: list[dict], procs: Processes,
                started: _dt.datetime) -> RunResult:
    """Metrics from the gathered shards, and the run's store record."""
    from fcr_common.provenance import code_version

    from fcr_eval.metrics.cost import describe_device
    from fcr_eval.metrics.extractors import metric_name
    from fcr_eval.metrics.robustness import RobustnessProtocol

    run, ev = st.run, ctx.exp.evaluation
    n, v = run.n_samples, run.variation
    metrics, per_prompt = run_metrics(ctx, run, st.prompts, parts)
    if ft is not None and "finetune_compute" in ev.metrics:
        metrics.append(finetune_fraction(ctx, ft, run))
    wall = max(p["sample_s"] for p in parts)
    metrics.append(MetricRecord("sample_wall_s_per_image", wall / n, "none", "none", n,
                                {"batch_size": ctx.exp.sampling.batch_size, "processes": procs.count,
                                 "note": "bulk sampling wall time (slowest process) incl. first-batch warm-up"}))
    shown = (metric_name("fd", ctx.extractor.name), "class_agreement", "clip_score", "clip_drift", "precision",
             "recall")
    logger.info("%s s%d: %s", v.id, run.seed, ", ".join(f"{m.metric}={m.value:.4g}" for m in metrics
                                                          if m.metric in shown))
    rob = run.robustness
    # Each setting is stored once: what has a column of its own is not repeated in ``params``
    # (``config`` is the full resolved record the run id is hashed from).
    variation = {k: x for k, x in asdict(v).items() if k not in _RUN_COLUMNS}
    params = {**variation, **RobustnessProtocol(rob.kind, dict(rob.settings)).as_params(),
              "robustness_id": rob.id, "n_samples": n, "finetune": ft and {k: ft.get(k) for k in
                                                                           ("run_dir", "steps", "final_unet",
                                                                            "stopped_early", "best_metric")},
              "weights": st.weights_key, "reference": ctx.reference_name, "prompts": st.prompts.source,
              "model_family": ctx.family, "dtype": ctx.exp.sampling.dtype, **procs.describe()}
    params.pop("process_index")
    planned_ft = run.finetune
    record = RunRecord(
        run_id=run.run_id, experiment_id=ctx.exp.id, variation_id=v.id, seed=run.seed, model=ctx.source,
        dataset=st.prompts.source, sampler=run.sampler.kind, scheduler=run.scheduler, resolution=run.resolution,
        num_inference_steps=run.steps, guidance_scale=run.guidance_scale, stride=v.stride,
        parallel_decoding=v.parallel_decoding if run.sampler.kind == "fd" else None,
        lambda_fcr=planned_ft.lambda_fcr if planned_ft and planned_ft.objective == "fcr" else None,
        lambda_oc=planned_ft.lambda_oc if planned_ft else None,
        delta_max=planned_ft.delta_max if planned_ft else None,
        blocks=planned_ft.blocks if planned_ft and planned_ft.objective == "fcr" else None,
        params=params, config=run.config, code_version=code_version(), device=describe_device(ctx.device),
        started_at=started, finished_at=_dt.datetime.now(_dt.timezone.utc).replace(tzinfo=None),
        run_dir=str(run.run_dir), **run.sampler.describe())
    samples = [s for p in parts for s in p["samples"]]
    reference = run.run_id if not run.sampler.cached else f"uncached:{st.weights_key}"
    return RunResult(record, metrics=metrics, per_prompt_scores=per_prompt, timings=st.timings,
                     feature_stats=list(st.feature_stats), samples=samples,
                     sample_metrics=sample_metrics(ctx, run, st.prompts, parts, reference),
                     cache_attribution=list(st.attribution))


# --------------------------------------------------------------------------------------------
# The whole experiment
# --------------------------------------------------------------------------------------------


def _select_device(opts: RunnerOptions) -> tuple[torch.device, Processes]:
    want_cpu = opts.device == "cpu" or (opts.device is None and not torch.cuda.is_available())
    procs = Processes.from_environment(cpu=want_cpu)
    if procs.count > 1 and opts.device in (None, "cuda"):
        return procs.device, procs  # one device per process (accelerate / torchrun)
    return torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu")), procs


def _session_times(exp: Experiment, procs: Processes) -> bool:
    """Whether the interleaved timing session times this experiment's samplers (one process,
    ``timing_rounds > 0``). Then the runs themselves only count forwards, FLOPs and memory: their
    own s/img would be one machine state each, and the session's rounds are what the table and the
    speed criteria read."""
    return procs.count == 1 and bool(exp.evaluation.timing_rounds)


def _timing_session(ctx: RunContext, plan, model_id: str, store: ResultsStore, progress: bool) -> None:
    """Time every unstressed variation of ``model_id`` interleaved, round by round, and store the
    session (replacing an earlier one): the speed criteria read it and carry a CI."""
    from fcr_eval.run.sampling import interleaved_timings

    exp = ctx.exp
    timed = [r for r in plan.runs if r.variation.model == model_id and r.seed == exp.seeds[0]
             and r.robustness.kind == "none"]
    rows = interleaved_timings(ctx, timed, exp.evaluation.timing_rounds, progress=progress)
    store.write_timing_rounds(exp.id, rows)
    logger.info("interleaved timing: %d variations × %d rounds × batch sizes %s stored", len(timed),
                exp.evaluation.timing_rounds, list(exp.evaluation.timing_batch_sizes))


def _record_failure(run: PlannedRun, err: BaseException) -> FailedRun:
    """Log a failed run and keep its traceback in its folder."""
    run_dir = Path(run.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "error.txt").write_text("".join(traceback.format_exception(type(err), err, err.__traceback__)))
    logger.error("run %s (%s seed %d) failed: %s: %s — traceback in %s", run.run_id, run.variation.id, run.seed,
                 type(err).__name__, err, run_dir / "error.txt")
    return FailedRun(run.run_id, run.variation.id, run.seed, f"{type(err).__name__}: {err}", str(run_dir))


def run_experiment(exp: Experiment, opts: RunnerOptions | None = None) -> Outcome:
    """Plan, fine-tune, sample, evaluate and store every variation × seed of ``exp``; resumable.

    Example:
        >>> run_experiment(load_experiment("experiments/mini-exp-1.toml", "quick"))
    """
    from fcr_common.locking import LockHeldError

    opts = opts or RunnerOptions()
    t0 = time.perf_counter()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    device, procs = _select_device(opts)
    store_path = Path(opts.store)
    plan = make_plan(exp, results_dir=store_path.parent, calibrate=False)
    check_models(exp)  # real models and local files: fail before any work
    check_inputs(exp, plan)
    # One runner per store: the lock is taken before the store, run or fine-tune folders exist, and
    # held until the last row is written, so a second runner never repeats or shares this work.
    # The main process takes it; the others learn whether it did (or they would wait forever).
    lock, refused = None, None
    if procs.is_main:
        try:
            lock = writer_lock(store_path, wait=opts.wait)
        except LockHeldError as err:
            refused = err
    if procs.broadcast(str(refused) if refused is not None else None) is not None:
        raise refused if refused is not None else RuntimeError("the main process could not lock the store")
    try:
        return _run_locked(exp, opts, plan, procs, device, store_path, t0)
    finally:
        if lock is not None:
            lock.release()


def _run_locked(exp: Experiment, opts: RunnerOptions, plan, procs: Processes, device: torch.device,
                store_path: Path, t0: float) -> Outcome:
    from tqdm.auto import tqdm

    show = opts.progress and procs.is_main
    results_dir = store_path.parent
    store = ResultsStore(store_path) if procs.is_main else None  # the only writer
    done = procs.broadcast(store.finished_run_ids(exp.id) if store is not None else None)
    todo = [r for r in plan.runs if r.run_id not in done]
    skipped = len(plan.runs) - len(todo)
    if procs.is_main:
        print(f"{exp.id}{f' (profile {exp.profile})' if exp.profile else ''}: {len(plan.runs)} runs, "
              f"{skipped} already in {store_path}, {len(todo)} to do; {len(plan.finetunes)} fine-tune(s)"
              + (f"; {procs.count} processes" if procs.count > 1 else ""), flush=True)
    failed: list[FailedRun] = []
    # One model at a time (exp-2 has two): its context holds the weights, text encoder and reference.
    by_model: dict[str, list[PlannedRun]] = {}
    for r in todo:
        by_model.setdefault(r.variation.model, []).append(r)
    # Within a model, a weights' uncached runs go first: their samples are the reference the cached
    # runs of the same weights and seed are paired with, so nothing is sampled twice.
    for runs in by_model.values():
        runs.sort(key=lambda r: r.sampler.cached)
    bar = tqdm(total=len(todo), desc=f"{exp.id} runs", disable=not show)
    for model_id, runs in by_model.items():
        # The main process extracts and caches the reference features; the others then read them.
        if procs.is_main:
            ctx = make_context(exp, results_dir, device, model_id)
            procs.barrier()
        else:
            procs.barrier()
            ctx = make_context(exp, results_dir, device, model_id)
        finetunes: dict[str, dict] = {}
        failed_finetunes: dict[str, str] = {}
        caches: dict = {}
        for r in runs:
            t_run = time.perf_counter()
            try:
                if r.finetune is not None and r.finetune.key in failed_finetunes:
                    raise RuntimeError(f"its fine-tune {r.finetune.key} failed: {failed_finetunes[r.finetune.key]}")
                if r.finetune is not None and r.finetune.key not in finetunes:
                    try:
                        finetunes[r.finetune.key] = run_finetune(ctx, r.finetune, exp, progress=show, procs=procs)
                    except Exception as err:
                        failed_finetunes[r.finetune.key] = f"{type(err).__name__}: {err}"
                        raise
                result = execute_run(ctx, r, exp, store if store is not None else results_dir, finetunes, caches,
                                     progress=show, procs=procs)
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as err:  # noqa: BLE001 - recorded, reported, and the exit code says so
                if procs.count > 1:
                    raise  # the other processes wait in a collective: fail them all
                failed.append(_record_failure(r, err))
                bar.update(1)
                continue
            if procs.is_main:
                written = store.write_run(result)  # one transaction: the whole run or nothing
                logger.info("stored %s (%s) in %.0f s", r.run_id, "written" if written else "already there",
                            time.perf_counter() - t_run)
            procs.barrier()
            bar.update(1)
        if procs.is_main and _session_times(exp, procs):
            _timing_session(ctx, plan, model_id, store, show)
        del ctx, caches
    bar.close()
    if not procs.is_main:
        return Outcome(store=store_path, runs_done=len(todo), runs_skipped=skipped, main=False)
    outcome = Outcome(store=store_path, wall_s=time.perf_counter() - t0, runs_done=len(todo) - len(failed),
                      runs_skipped=skipped, failed=failed)
    from fcr_eval.metrics.cost import describe_device

    print(f"\nwall time {outcome.wall_s / 60:.1f} min ({outcome.runs_done} runs executed, {skipped} skipped"
          f"{f', {len(failed)} FAILED' if failed else ''}); device {describe_device(device)}"
          + (f" × {procs.count} processes" if procs.count > 1 else ""), flush=True)
    return outcome
