"""Fine-tuning for an experiment: run (or resume, or reuse) each planned fine-tune, the moving-FD
validation that early stopping reads, and the fine-tune's compute as a fraction of pre-training.

Every run that needs the same weights points at one :class:`~fcr_eval.plan.planner.PlannedFinetune`;
its folder is ``results/runs/<experiment>/finetune/<key>/`` and holds the checkpoints, the
trainer's log and ``fcr_eval_weights.json`` (written when the fine-tune is finished: the weights
the runs sample).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from fcr_eval.plan.planner import PlannedFinetune, PlannedRun
from fcr_eval.run.contexts import RunContext
from fcr_eval.run.distributed import Processes
from fcr_eval.run.sampling import sample_rows
from fcr_eval.run.schedulers import make_sampling_scheduler
from fcr_eval.spec.experiment import Experiment
from fcr_eval.store import MetricRecord

__all__ = ["run_finetune", "finetune_fraction"]

logger = logging.getLogger(__name__)


def run_finetune(ctx: RunContext, ft: PlannedFinetune, exp: Experiment, progress: bool = True,
                 procs: Processes | None = None) -> dict:
    """Fine-tune (or resume, or reuse a finished fine-tune); returns the run's summary dict. With
    several processes every one of them calls this (the trainer runs data-parallel on accelerate)."""
    from fcr_train.api import FinetuneConfig, finetune
    from fcr_train.trainer import TrainConfig

    out = Path(ft.output_dir)
    chosen = out / "fcr_eval_weights.json"  # written once the fine-tune is finished: the weights runs use
    if chosen.is_file():
        s = json.loads(chosen.read_text())
        if s.get("final_unet") and Path(s["final_unet"]).is_dir():
            logger.info("fine-tune %s already finished (%d steps), reusing %s", ft.key, s["steps"], s["final_unet"])
            return s
    es = ft.early_stopping
    validation_fn = _moving_fd_validation(ctx, exp, es, out) if es is not None else None
    model, data, hflip = ctx.finetune_inputs(ft.data)
    cfg = FinetuneConfig(
        model=model, data=data,
        train=TrainConfig(
            output_dir=str(out), max_steps=ft.steps, batch_size=ft.batch_size, lr=ft.lr,
            weight_decay=ft.weight_decay, warmup_steps=ft.warmup_steps, ema_decay=ft.ema_decay,
            mixed_precision=ft.mixed_precision, checkpoint_every=ft.checkpoint_every, keep_checkpoints=2,
            validate_every=es.every if es else None, early_stopping_patience=es.patience if es else None,
            seed=ft.seed, hflip=hflip, cond_dropout=ft.cond_dropout, resume=True,
            progress=progress, cpu=ctx.device.type == "cpu",
            fcr=ft.fcr_config(), objective=ft.objective_config()),
    )
    logger.info("fine-tuning %s: %s Δmax=%d %s%s distance=%s, %d steps × batch %d (folder %s)", ft.key,
                ft.label, ft.delta_max, ft.delta_unit, "" if ft.objective != "fcr" else f" blocks={ft.blocks}",
                ft.distance, ft.steps, ft.batch_size, out)
    t0 = time.perf_counter()
    result = finetune(cfg, validation_fn=validation_fn)
    s = result.to_dict()
    s["wall_time_s"] = time.perf_counter() - t0
    if result.best_checkpoint is not None:  # early stopping: sample the best weights (if still on disk)
        best = Path(result.best_checkpoint)
        for sub in ("unet_ema", "unet"):
            if (best / sub).is_dir():
                s["final_unet"] = str(best / sub)
                break
    if not s.get("final_unet"):
        raise RuntimeError(f"fine-tune {ft.key} produced no weights (see {out / 'train.log'})")
    if procs is None or procs.is_main:
        chosen.write_text(json.dumps(s, indent=2, default=str))
    if procs is not None:
        procs.barrier()
    return s


def _moving_fd_validation(ctx: RunContext, exp: Experiment, es, output_dir: Path):
    """``fn(unet, step)`` → moving mean (over ``window`` validations) of the Fréchet distance of
    ``mini_val_size`` samples (no cache) against the reference features. The history lives in the
    fine-tune's folder, so a resumed fine-tune continues the same window."""
    from fcr_eval.metrics.extractors import EXTRACT_BATCH
    from fcr_eval.metrics.frechet import frechet_distance_to_reference
    from fcr_eval.metrics.streaming import RunningMoments
    from fcr_eval.run.batches import BatchGrid
    from fcr_eval.run.early_stopping import MovingValidation

    n = es.mini_val_size
    prompts = ctx.prompts(es.mini_val or exp.sampling.eval_prompts, n)
    res = ctx.sampling_resolution()
    grid = BatchGrid(n, exp.sampling.batch_size)

    def fd(unet, step: int) -> float:
        sched = make_sampling_scheduler(exp.sampling.scheduler, ctx.scheduler_config())
        noise = ctx.noise_stream(n, res, 12345)
        moments, pending = None, []
        for k in range(grid.count):  # batch by batch; the pixels of a batch are dropped once extracted
            rows = grid.bounds(k)
            imgs = sample_rows(ctx, unet, sched, prompts, noise.rows(rows.start, rows.stop), rows,
                               exp.sampling.num_inference_steps, exp.sampling.guidance_scale)
            # features EXTRACT_BATCH images at a time in sample order, as one whole-set extraction would
            buf = torch.cat([*pending, ctx.evaluation_images(imgs)])
            cut = len(buf) if k == grid.count - 1 else len(buf) - len(buf) % EXTRACT_BATCH
            if cut:
                feats = ctx.extractor.extract(buf[:cut]).features
                moments = moments or RunningMoments(feats.shape[1])
                moments.update(feats)
            pending = [buf[cut:]]
        value = frechet_distance_to_reference(ctx.reference.features, *moments.statistics())
        logger.info("step %d: mini-val FD %.3f (%s, %d samples)", step, value, ctx.extractor.name, n)
        return value

    return MovingValidation(fd, es.window, Path(output_dir) / "moving_fd_history.json")


def finetune_fraction(ctx: RunContext, ft: dict, run: PlannedRun) -> MetricRecord:
    """Fine-tune compute ÷ the base model's pre-training compute, both as training FLOPs. ``ft`` is
    the finished fine-tune's summary (its actual step count)."""
    from fcr_eval.metrics.cost import finetune_compute_fraction, training_flops

    planned = run.finetune
    cost = planned.cost
    steps = int(ft.get("steps") or planned.steps)  # fewer than planned when early stopping stopped it
    extra = planned.extra_forward_share() * cost.flops_per_forward
    ft_flops = training_flops(cost.flops_per_forward, steps * planned.batch_size,
                              extra_forward_flops_per_sample=extra)
    details = {"finetune_flops": ft_flops, "finetune_samples": steps * planned.batch_size,
               "flops_per_forward_from": cost.source}
    pre_flops, how = ctx.pretrain_flops(cost.flops_per_forward)
    details.update(how)
    if pre_flops:
        details["pretrain_flops"] = pre_flops
        value = finetune_compute_fraction(ft_flops, pre_flops)
    else:
        value = float("nan")
    return MetricRecord("finetune_compute_fraction", value, "none", "none", 0, details)
