"""Samplers the runner builds for each model family."""

from __future__ import annotations

import torch
from fcr_eval.run.sampling import sample_batch
from fcr_eval.run.schedulers import make_sampling_scheduler
from fcr_sample.testing import tiny_sd_pipeline
from fcr_train.embedded import load_embedded_base, make_scheduler


def test_dpm_solver_clips_x0_like_ddim_on_the_embedded_model_and_leaves_sd_alone():
    ddim_cfg = make_scheduler("ddim").config
    dpm = make_sampling_scheduler("dpm-solver++", ddim_cfg)
    assert ddim_cfg.clip_sample and dpm.config.thresholding and dpm.config.sample_max_value == 1.0
    sd = make_sampling_scheduler("dpm-solver++", tiny_sd_pipeline().scheduler.config)
    assert not sd.config.thresholding


def test_dpm_solver_samples_of_the_shipped_model_are_not_saturated():
    """Regression: without x̂0 clipping DPM-Solver++ (20 steps) turned every pixel of the shipped
    base model's samples to 0 or 1 (class agreement 0.20 vs 0.69 clipped, docs/mini-exp-2-robustness)."""
    torch.manual_seed(0)
    base = load_embedded_base()
    labels = torch.arange(20) % 10
    cond = base.class_states(labels)
    null = base.null_states.expand(len(cond), -1, -1)
    x_T = torch.randn((20, 1, 28, 28), generator=torch.Generator().manual_seed(0))
    sched = make_sampling_scheduler("dpm-solver++", make_scheduler("ddim").config)
    with torch.no_grad():
        imgs = sample_batch(base.unet.eval(), sched, x_T, cond, null, 20, 2.0)
    saturated = ((imgs == 0) | (imgs == 1)).float().mean().item()
    assert saturated < 0.6, saturated
