"""The experiment runner: plan → fine-tune → sample → evaluate → store, resumable.

:func:`run_experiment` executes every variation × seed of an :class:`~fcr_eval.spec.experiment.Experiment`:

1. plans the runs (:mod:`fcr_eval.plan.planner`): each run's settings are resolved once into typed
   objects (the sampler's fcr-sample config, the fine-tune it uses, its robustness protocol and
   prompts) and carried as a :class:`~fcr_eval.plan.planner.PlannedRun`; checks that every model can be
   loaded and every local file it needs is there (:mod:`fcr_eval.plan.validation`) before any work;
   the model family (embedded default or Stable Diffusion) is a :mod:`fcr_eval.run.contexts` context;
2. fine-tunes once per distinct fine-tune (:mod:`fcr_eval.run.finetuning`);
3. per run (:func:`execute_run`), batch by batch (:mod:`fcr_eval.run.batches`): x_T rows from the
   seed's stream (:mod:`fcr_eval.run.noise`), samples with the run's sampler and scheduler under
   its robustness stress (:mod:`fcr_eval.run.sampling`), pairs them with the uncached reference
   batch, evaluates them (:mod:`fcr_eval.run.evaluation`), writes their PNGs, spills their
   features and makes the batch durable, dropping its pixels; then measures cost, σ²_Δ for the
   weights, the fine-tune compute, and the set-level metrics from the spills;
4. writes the run to the store in one transaction with its config, extractor, code version and
   device. Finished runs are skipped and a killed run resumes at its first unfinished batch;
   a run killed midway leaves only files in its own folder, never rows. A run that raises is
   recorded as failed (its traceback in ``<run folder>/error.txt``), the others go on, and the
   :class:`Outcome` is not ``ok``.

Under ``accelerate launch`` / ``torchrun`` each run's batches are spread over the processes
(:mod:`fcr_eval.run.distributed`); the main process measures cost on its own device, computes the
metrics from every batch and is the only one that writes the store.

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

import numpy as np
import torch

from fcr_eval.plan.planner import PlannedRun, make_plan
from fcr_eval.plan.samplers import apply_sampler, remove_sampler
from fcr_eval.plan.validation import check_inputs, check_models
from fcr_eval.run.batches import BatchGrid, ReferencePlan, ReferenceSpill, RunBatches
from fcr_eval.run.contexts import Prompts, RunContext, make_context
from fcr_eval.run.distributed import Processes
from fcr_eval.run.evaluation import (
    evaluate_batch,
    merge_batches,
    quality_metric_names,
    run_metrics,
    sample_metrics,
    save_samples,
    shard_prompts,
)
from fcr_eval.run.finetuning import finetune_fraction, run_finetune
from fcr_eval.run.noise import InitialNoise
from fcr_eval.run.sampling import (
    attack_rows,
    measure_cost,
    new_scheduler,
    reference_key,
    sample_rows,
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
        reference: how cached runs get their uncached reference batches
            (:data:`fcr_eval.run.batches.REFERENCE_MODES`): ``spill`` reads them back from the float
            spill an earlier run of the experiment wrote, ``sample`` samples them in the run's loop.
    """

    store: Path = Path("results/fcr.duckdb")
    threads: int | None = None
    device: str | None = None
    progress: bool = True
    wait: bool | float = False
    reference: str = "spill"


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
    """What the steps of one run hand each other (nothing here grows with the sample count)."""

    run: PlannedRun
    unet: torch.nn.Module
    weights_key: str
    prompts: Prompts
    noise: InitialNoise
    grid: BatchGrid
    files: RunBatches
    reference: ReferenceSpill | None = None
    spill_reference: bool = False
    timings: list = field(default_factory=list)
    feature_stats: list[FeatureStat] = field(default_factory=list)
    attribution: list[AttributionValue] = field(default_factory=list)


def execute_run(ctx: RunContext, run: PlannedRun, exp: Experiment, store: ResultsStore | Path,
                finetunes: dict[str, dict], caches: dict, progress: bool = True,
                procs: Processes | None = None, references: ReferencePlan | None = None) -> RunResult | None:
    """Sample and evaluate one variation × seed batch by batch; returns the store-ready
    :class:`RunResult` on the main process (``None`` on the others; nothing is written to the store here).

    Each batch is sampled, paired with its uncached reference batch, evaluated, its PNGs written and
    its record made durable (:mod:`fcr_eval.run.batches`) before the next; a batch already on disk
    (a resumed run) is not redone. Processes share the batches (:class:`BatchGrid`); the main
    process measures cost, attributes the cache error and computes the metrics from every batch's
    record and the feature spills. ``store`` is the results store or, on processes that do not
    write, its folder (samples go under it). ``finetunes`` maps a fine-tune key to its finished
    summary. ``caches`` holds σ²_Δ per weights × seed; ``references`` says where uncached reference
    batches are spilled for the runs after this one (``None``: every cached run samples its own)."""
    procs = procs or Processes()
    started = _dt.datetime.now(_dt.timezone.utc).replace(tzinfo=None)
    _write_run_config(run, procs)
    ft = finetunes[run.finetune.key] if run.finetune is not None else None
    st = _load_run(ctx, run, ft, procs, references)
    _feature_variance(ctx, st, caches, procs)
    root = store.root if isinstance(store, ResultsStore) else Path(store).resolve()
    _sample_batches(ctx, st, root, procs, progress)
    procs.barrier()  # every batch is on disk (an FGSM run's attribution reads the attacked x_T from them)
    if not procs.is_main:
        return None
    _measure_cost(ctx, st, procs)
    _attribute(ctx, st, procs, progress)
    return _run_result(ctx, st, ft, procs, started)


def _write_run_config(run: PlannedRun, procs: Processes) -> None:
    if procs.is_main:
        run_dir = Path(run.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps({"run_id": run.run_id, **run.config}, indent=2, default=str))


def run_batches(exp: Experiment, run: PlannedRun) -> RunBatches:
    """The durable batch files of ``run`` (:mod:`fcr_eval.run.batches`)."""
    return RunBatches(run.run_dir, run.run_id, BatchGrid(run.n_samples, exp.sampling.batch_size),
                      label=f"{run.variation.id} seed {run.seed}")


def _load_run(ctx: RunContext, run: PlannedRun, ft: dict | None, procs: Processes,
              references: ReferencePlan | None) -> _RunState:
    """The run's weights, prompts, x_T stream (the same x_T per seed across variations: paired)
    and batch files (checked against the plan, made by the main process)."""
    weights = Path(ft["final_unet"]) if ft else None
    prompts = ctx.prompts(run.eval_prompts, run.n_samples, robustness=run.robustness)
    files = run_batches(ctx.exp, run)
    files.check()
    if procs.is_main:
        files.start()
    procs.barrier()
    st = _RunState(run=run, unet=ctx.unet(weights), weights_key=str(weights) if weights else "base", prompts=prompts,
                   noise=ctx.noise_stream(run.n_samples, run.resolution, run.seed), grid=files.grid, files=files)
    if references is not None:
        st.reference, st.spill_reference = references.spill_for(run)
    return st


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


def _sample_batches(ctx: RunContext, st: _RunState, root: Path, procs: Processes, progress: bool) -> None:
    """This process's unfinished batches, one at a time (:func:`_one_batch`), with a progress bar
    (ETA) and a log line per batch."""
    from tqdm.auto import tqdm

    run = st.run
    mine = st.grid.assigned(procs.index, procs.count)
    todo = [k for k in mine if not st.files.done(k)]
    if len(todo) < len(mine):
        logger.info("%s s%d: resuming at batch %d of %d (%d of this process's batches already on disk)",
                    run.variation.id, run.seed, todo[0] + 1 if todo else st.grid.count, st.grid.count,
                    len(mine) - len(todo))
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=f"{run.variation.id} s{run.seed}",
               unit="batch", disable=not progress, leave=False)
    for k in todo:
        t0 = time.perf_counter()
        _one_batch(ctx, st, k, root, procs)
        rows = st.grid.bounds(k)
        logger.info("%s s%d: batch %d/%d (samples %d-%d) finished in %.1f s", run.variation.id, run.seed, k + 1,
                    st.grid.count, rows.start, rows.stop - 1, time.perf_counter() - t0)
        bar.update(1)
    bar.close()


def _one_batch(ctx: RunContext, st: _RunState, k: int, root: Path, procs: Processes) -> None:
    """Batch ``k``: attack x_T (FGSM runs), sample with the run's cache, get the uncached reference
    batch (the run's own images when uncached, the spill, or sampled here), evaluate, write the
    PNGs and the grid (batch 0), then the feature rows and the batch's record — and drop the pixels."""
    run = st.run
    rows = st.grid.bounds(k)
    x_T = st.noise.rows(rows.start, rows.stop)
    scheduler = new_scheduler(ctx, run)
    record: dict = {"index": k, "start": rows.start, "stop": rows.stop, "process": procs.index}
    apply_sampler(st.unet, run.sampler)
    try:
        if run.robustness.kind == "fgsm_latent":
            x_T, attacked, record["fgsm_mse_sum"] = attack_rows(ctx, st.unet, scheduler, run, st.prompts, x_T, rows)
            if run.attribution_samples:  # the attribution walks the attacked x_T of the first samples
                keep = range(rows.start, min(rows.stop, run.attribution_samples))
                record["x_T"] = x_T[: len(keep)].clone()
        t0 = time.perf_counter()
        images = sample_rows(ctx, st.unet, scheduler, st.prompts, x_T, rows, run.steps, run.guidance_scale)
        record["sample_s"] = time.perf_counter() - t0
    finally:
        remove_sampler(st.unet, run.sampler)
    reference, ref_features = _reference_batch(ctx, st, k, rows, x_T, images)
    values = evaluate_batch(ctx, run, st.prompts, images, rows, reference, ref_features)
    if st.spill_reference and not st.reference.has(k):
        st.reference.write(k, reference.numpy(), ref_features if ref_features is not None else values.get("features"))
    saved = range(rows.start, min(rows.stop, run.save_samples))
    record["samples"] = save_samples(root, ctx.exp, run, st.prompts, images[: len(saved)], saved) if len(saved) else []
    if k == 0:
        ctx.save_grid(images, shard_prompts(st.prompts, rows), Path(run.run_dir) / "grid.png",
                      title=f"{ctx.exp.id} {run.variation.id} seed {run.seed}")
    for name in ("features", "logits"):
        arr = values.pop(name, None)
        if arr is not None:
            st.files.spill(name, arr.shape[1]).write_rows(rows.start, arr)
    record["values"] = values
    st.files.write(k, record)


def _reference_batch(ctx: RunContext, st: _RunState, k: int, rows: range, x_T: torch.Tensor, images: torch.Tensor):
    """The same weights' samples *without* a cache from the same x_T and prompts, and their
    quality features when known: an uncached run is its own reference; else the spill an earlier
    run of this experiment wrote (exact float32), else sampled here (no cache is attached now)."""
    run = st.run
    if not run.sampler.cached:
        return images, None  # evaluate_batch takes the run's own features as the reference's
    if st.reference is not None and st.reference.has(k):
        ref, feats = st.reference.read(k)
        return torch.from_numpy(np.array(ref)), (np.array(feats) if feats is not None else None)
    ref = sample_rows(ctx, st.unet, new_scheduler(ctx, run), st.prompts, x_T, rows, run.steps, run.guidance_scale)
    feats = None
    if ctx.reference is not None and ctx.extractor is not None and quality_metric_names(ctx.exp.evaluation.metrics):
        feats = ctx.extractor.extract(ctx.evaluation_images(ref)).features
    return ref, feats


def _measure_cost(ctx: RunContext, st: _RunState, procs: Processes) -> None:
    """Timing, forward counts, FLOPs and peak memory with the run's cache attached (main process;
    the timed seeds only); the cache is removed again whatever happens."""
    run, ev = st.run, ctx.exp.evaluation
    cost_metrics = ("sec_per_image", "flops", "peak_memory", "unet_forwards")
    timed_seed = ev.timing_seeds == "all" or run.seed == ctx.exp.seeds[0]
    if not (timed_seed and procs.is_main and any(m in ev.metrics for m in cost_metrics)):
        return
    scheduler = new_scheduler(ctx, run)
    x_T = st.noise.rows(0, min(max(ev.timing_batch_sizes), run.n_samples))
    apply_sampler(st.unet, run.sampler)
    try:
        st.timings = measure_cost(ctx, st.unet, scheduler, run, st.prompts, x_T,
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
    x_T = st.noise.rows(0, k)
    if run.robustness.kind == "fgsm_latent":  # the attacked rows, from the batches that hold them
        x_T = torch.cat([st.files.read(b)["x_T"] for b in range(st.grid.count) if st.grid.bounds(b).start < k])
    cond, null = ctx.encode(st.prompts, slice(0, k))
    t0 = time.perf_counter()
    res = attribute_cache_error(
        st.unet, new_scheduler(ctx, run), x_T.to(ctx.device), cond, null, cache=run.sampler.cache,
        steps=run.steps, guidance_scale=run.guidance_scale, propagation=run.attribution_propagation,
        progress=progress)
    st.attribution = AttributionValue.from_rows(res.to_rows(), k)
    logger.info("%s s%d: cache attribution over %d samples, %d served steps in %.1f s", run.variation.id,
                run.seed, k, len(res.steps), time.perf_counter() - t0)


#: Variation fields that are columns of ``runs`` (or the effective schedule's columns).
_RUN_COLUMNS = ("id", "sampler", "stride", "parallel_decoding", "lambda_fcr", "lambda_oc", "delta_max", "blocks",
                "scheduler", "num_inference_steps", "guidance_scale", "resolution", "description")


def _run_result(ctx: RunContext, st: _RunState, ft: dict | None, procs: Processes,
                started: _dt.datetime) -> RunResult:
    """Metrics from every finished batch's record and the feature spills, and the run's store record."""
    from fcr_common.provenance import code_version

    from fcr_eval.metrics.cost import describe_device
    from fcr_eval.metrics.extractors import metric_name
    from fcr_eval.metrics.robustness import RobustnessProtocol

    run, ev = st.run, ctx.exp.evaluation
    n, v = run.n_samples, run.variation
    records = [st.files.read(k) for k in range(st.grid.count)]  # per-sample values: a few floats each
    values = merge_batches(records)
    metrics, per_prompt = run_metrics(ctx, run, st.prompts, values, features=st.files.open_spill("features"),
                                      logits=st.files.open_spill("logits"),
                                      fgsm_mse_sum=sum(r.get("fgsm_mse_sum", 0.0) for r in records))
    if ft is not None and "finetune_compute" in ev.metrics:
        metrics.append(finetune_fraction(ctx, ft, run))
    # the slowest process's summed sampling time (batch k is process k mod P's)
    wall = max(sum(r["sample_s"] for r in records if r["index"] % procs.count == p) for p in range(procs.count))
    metrics.append(MetricRecord("sample_wall_s_per_image", wall / n, "none", "none", n,
                                {"batch_size": ctx.exp.sampling.batch_size, "processes": procs.count,
                                 "note": "bulk sampling wall time (slowest process, summed over its batches) "
                                         "incl. first-batch warm-up"}))
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
    samples = [s for r in records for s in r["samples"]]
    reference = run.run_id if not run.sampler.cached else f"uncached:{st.weights_key}"
    return RunResult(record, metrics=metrics, per_prompt_scores=per_prompt, timings=st.timings,
                     feature_stats=list(st.feature_stats), samples=samples,
                     sample_metrics=sample_metrics(ctx, run, st.prompts, values, reference),
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
    for r in todo:  # a run folder of another run is refused before any work
        run_batches(exp, r).check()
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
    references = ReferencePlan(store_path.parent / "runs" / exp.id / ".reference",
                               [r for runs in by_model.values() for r in runs],
                               lambda r: reference_key(r, exp.sampling.batch_size), mode=opts.reference)
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
                                     progress=show, procs=procs, references=references)
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
                run_batches(exp, r).remove()  # its batches are rows now
            procs.barrier()
            references.done(r, remove=procs.is_main)
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
