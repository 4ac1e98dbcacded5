"""Sampling a run's images: one batch of denoising from its rows of the run's x_T, the FGSM attack
on a batch's x_T, what the uncached reference samples that paired metrics compare against depend
on, and the cost measurement (timings, forward counters, FLOPs, peak memory).

Every function takes the resolved :class:`~fcr_eval.plan.planner.PlannedRun` (or its typed parts); none
reads settings back out of the run's config record.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch

from fcr_eval.plan.planner import PlannedRun
from fcr_eval.plan.planner import reference_key as plan_reference_key
from fcr_eval.plan.samplers import apply_sampler, remove_sampler
from fcr_eval.run.contexts import Prompts, RunContext
from fcr_eval.run.schedulers import make_sampling_scheduler
from fcr_eval.store import TimingRecord

__all__ = ["sample_batch", "sample_rows", "new_scheduler", "attack_rows", "attack_settings", "reference_key",
           "measure_cost", "interleaved_timings"]

logger = logging.getLogger(__name__)


def sample_batch(unet, scheduler, x_T: torch.Tensor, cond: torch.Tensor, null: torch.Tensor, steps: int,
                 guidance: float, decode=None) -> torch.Tensor:
    """One sampling run from ``x_T`` (:func:`fcr_sample.denoise`); images in [0, 1]. ``decode`` maps
    the final state to images in [0, 1] (the VAE for latent models; default: pixels in [-1, 1]).
    An attached cache's per-step work (Faster Diffusion's prior noise injection) runs inside
    ``denoise`` through its step callback. Differentiable when called under grad."""
    from fcr_sample import denoise

    x = denoise(unet, scheduler, x_T, cond, null, steps=steps, guidance_scale=guidance)
    return decode(x) if decode is not None else (x.clamp(-1, 1) + 1) / 2


def sample_rows(ctx: RunContext, unet, scheduler, prompts: Prompts, x_T: torch.Tensor, rows: range, steps: int,
                guidance: float) -> torch.Tensor:
    """Images of the prompts ``rows`` from their initial noise ``x_T`` (those rows only), one
    batch (no grad), on the CPU as float32."""
    with torch.no_grad():
        c, nl = ctx.encode(prompts, slice(rows.start, rows.stop))
        return sample_batch(unet, scheduler, x_T.to(ctx.device), c, nl, steps, guidance, decode=ctx.decode).float().cpu()


def new_scheduler(ctx: RunContext, run: PlannedRun):
    """A fresh sampling scheduler for ``run``, under its noise-schedule stress if it has one."""
    from fcr_eval.metrics.robustness import perturb_scheduler

    s = make_sampling_scheduler(run.scheduler, ctx.scheduler_config())
    rob = run.robustness
    if rob.kind == "schedule_perturbation":  # keeps DDIM finite when the perturbed ᾱ lose their order
        s = perturb_scheduler(s, std=float(rob.settings.get("std", 0.05)), seed=run.seed)
    return s


def attack_rows(ctx: RunContext, unet, scheduler, run: PlannedRun, prompts: Prompts, x_T: torch.Tensor,
                rows: range) -> tuple[torch.Tensor, range, float]:
    """FGSM on the initial latent (exp-2's adversarial latent noise) of one batch: the rows of
    ``rows`` (whose initial noise is ``x_T``) among the run's first ``n_images``. The loss is the
    distance of the image from the clean one through the run's own sampler; a random start in the
    ε-ball (seeded per run and batch start) avoids the zero gradient at x_T.

    Returns ``(x_T with the attacked rows replaced, the attacked rows, their summed image MSE)``."""
    from fcr_eval.metrics.robustness import fgsm_initial_latent

    settings = attack_settings(run)
    attacked = range(rows.start, min(rows.stop, settings["k"]))
    if not len(attacked):
        return x_T, attacked, 0.0
    sl = slice(attacked.start, attacked.stop)
    c, nl = ctx.encode(prompts, sl)
    z = x_T[: len(attacked)].to(ctx.device)
    with torch.no_grad():
        clean = sample_batch(unet, scheduler, z, c, nl, run.steps, run.guidance_scale, ctx.decode)

    def loss_fn(zz):
        return (sample_batch(unet, scheduler, zz, c, nl, run.steps, run.guidance_scale, ctx.decode) - clean).pow(2).mean()

    z_adv = fgsm_initial_latent(loss_fn, z, epsilon=settings["epsilon"], steps=settings["steps"],
                                generator=torch.Generator().manual_seed(run.seed * 100_003 + attacked.start))
    with torch.no_grad():
        mse = float(loss_fn(z_adv)) * len(z)
    out = x_T.clone()
    out[: len(attacked)] = z_adv.cpu().to(x_T.dtype)
    return out, attacked, mse


def attack_settings(run: PlannedRun) -> dict:
    """The FGSM run's attack: how many of its first samples (``k``), ε and steps."""
    rob = run.robustness
    return {"k": min(run.n_samples, int(rob.settings.get("n_images", run.n_samples))),
            "epsilon": float(rob.settings.get("epsilon", 0.1)), "steps": int(rob.settings.get("steps", 10))}


def reference_key(run: PlannedRun, batch_size: int) -> tuple:
    """What a run's uncached reference samples depend on: the plan's sharing rule
    (:func:`fcr_eval.plan.planner.reference_key`: weights, the seed's x_T — an FGSM run's attacked
    x_T is its own —, scheduler, steps, guidance, resolution, stress and prompts) plus the sample
    count and the batch grid the spill is written in. Runs with one key are paired with the same
    uncached samples; an uncached run's own samples are the reference of its key."""
    return (*plan_reference_key(run), run.n_samples, batch_size)


def measure_cost(ctx: RunContext, unet, scheduler, run: PlannedRun, prompts: Prompts, x_T: torch.Tensor,
                 *, time_calls: bool = True) -> list[TimingRecord]:
    """Timing at each of the experiment's batch sizes after warm-up, forward counters, FLOPs and
    peak memory of ONE sampling run of that batch size, on the context's device. The cache hook
    (if any) must be attached. With ``time_calls=False`` (an interleaved timing session times the
    samplers instead) the record has no ``sec_per_image`` and no timed repeats run."""
    from fcr_sample import get_cache_stats, reset_cache_stats

    from fcr_eval.metrics.cost import (
        count_flops,
        measure_peak_memory,
        time_per_image,
        to_timing_record,
    )

    ev = ctx.exp.evaluation
    n = run.n_samples
    timings = []
    flops_per_image = None
    for b in ev.timing_batch_sizes:
        reps = -(-b // min(b, n))
        c, nl = ctx.encode(prompts, slice(0, min(b, n)))
        z = x_T[: min(b, n)].repeat(reps, *([1] * (x_T.ndim - 1)))[:b].to(ctx.device)
        c = c.repeat(reps, 1, 1)[:b]
        nl = nl.repeat(reps, 1, 1)[:b]

        def fn(z=z, c=c, nl=nl):
            with torch.no_grad():
                return sample_batch(unet, scheduler, z, c, nl, run.steps, run.guidance_scale, ctx.decode)

        # The warm-up call doubles as the forward-count and peak-memory run (one sampling
        # run of b images), so timing adds only `timing_repeats` calls.
        if run.sampler.cached:
            reset_cache_stats(unet)
        peak = measure_peak_memory(fn, ctx.device) if "peak_memory" in ev.metrics else None
        if peak is None:
            fn()
        counts = get_cache_stats(unet) if run.sampler.cached else {
            "unet_calls": run.steps, "encoder_forwards": run.steps, "decoder_forwards": run.steps}
        if "flops" in ev.metrics and flops_per_image is None:  # per image: the same at every batch size
            flops_per_image = count_flops(fn) / b
        if time_calls:
            timing = time_per_image(fn, b, warmup=0, repeats=ev.timing_repeats, device=ctx.device)
            timing = dataclasses.replace(timing, warmup=1)
            timings.append(to_timing_record(timing, flops_per_image=flops_per_image, peak_memory=peak,
                                            forward_counts=counts))
        else:
            record = to_timing_record(None, batch_size=b, device=ctx.device, flops_per_image=flops_per_image,
                                      peak_memory=peak, forward_counts=counts)
            timings.append(record)
    return timings


def interleaved_timings(ctx: RunContext, runs: list[PlannedRun], rounds: int, progress: bool = False
                        ) -> list[dict]:
    """The experiment's timing session: in each of ``rounds`` rounds every run's sampler is timed
    back to back (one sampling call per batch size, order reversed every other round), so a slow
    spell of a shared machine hits every variation alike and speed-ups pair by round.

    All samplers run on the base weights: speed does not depend on weight values (design.md §3),
    and one UNet keeps the session's memory flat. Each call is device-synchronised; peak memory
    is measured around the same call. One warm-up call per sampler and batch size precedes the
    rounds. Returns one row per (run, batch size, round) for
    :meth:`~fcr_eval.store.ResultsStore.write_timing_rounds`.
    """
    from fcr_common.provenance import code_version
    from tqdm.auto import tqdm

    from fcr_eval.metrics.cost import describe_device, measure_peak_memory, synchronize

    if not runs or rounds < 1:
        return []
    ev = ctx.exp.evaluation
    unet = ctx.unet(None)
    first = runs[0]
    prompts = ctx.prompts(first.eval_prompts, first.n_samples, robustness=first.robustness)
    x_T = ctx.initial_noise(min(max(ev.timing_batch_sizes), first.n_samples), first.resolution, first.seed)
    device, version = describe_device(ctx.device), code_version()
    rows = []
    total = len(ev.timing_batch_sizes) * (rounds + 1) * len(runs)
    bar = tqdm(total=total, desc=f"{ctx.exp.id} interleaved timing", disable=not progress, leave=False)
    for b in ev.timing_batch_sizes:
        reps = -(-b // min(b, first.n_samples))
        c, nl = ctx.encode(prompts, slice(0, min(b, first.n_samples)))
        z = x_T[: min(b, first.n_samples)].repeat(reps, *([1] * (x_T.ndim - 1)))[:b].to(ctx.device)
        c, nl = c.repeat(reps, 1, 1)[:b], nl.repeat(reps, 1, 1)[:b]
        for r in range(-1, rounds):  # round -1 is the warm-up
            order = list(enumerate(runs)) if r % 2 == 0 else list(enumerate(runs))[::-1]
            for position, (_, run) in enumerate(order):
                scheduler = new_scheduler(ctx, run)
                apply_sampler(unet, run.sampler)
                try:
                    elapsed = {}

                    def call(run=run, scheduler=scheduler, elapsed=elapsed, z=z, c=c, nl=nl):
                        synchronize(ctx.device)
                        t0 = time.perf_counter()
                        with torch.no_grad():
                            sample_batch(unet, scheduler, z, c, nl, run.steps, run.guidance_scale, ctx.decode)
                        synchronize(ctx.device)
                        elapsed["s"] = time.perf_counter() - t0

                    peak, kind = measure_peak_memory(call, ctx.device)
                finally:
                    remove_sampler(unet, run.sampler)
                bar.update(1)
                if r < 0:
                    continue
                rows.append({"variation_id": run.variation.id, "run_id": run.run_id, "batch_size": b, "round": r,
                             "position": position, "sec_per_image": elapsed["s"] / b, "peak_memory_bytes": peak,
                             "memory_kind": kind, "device": device, "code_version": version})
    bar.close()
    return rows
