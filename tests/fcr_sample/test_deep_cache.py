"""fcr_sample.deep_cache against the reference implementation (PyPI ``deepcache``).

The package is a test-only dependency (fcr-sample's ``test`` group). Its ``DeepCacheSDHelper``
covers the uniform mode; its non-uniform schedule lives in a pipeline fork that no longer imports
under current diffusers, so that schedule's function is read from the installed source and the
helper is driven at those steps.
"""

import ast
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from DeepCache import DeepCacheSDHelper  # fcr-sample's test group installs deepcache
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from fcr_sample import (
    DeepCacheConfig,
    apply_deep_cache,
    denoise,
    get_cache_stats,
    remove_deep_cache,
)
from fcr_sample.deep_cache import cached_module_names, nonuniform_full_steps
from fcr_sample.testing import sample_latents, tiny_unet_config


def _pipe(make_pipe, layers_per_block: int = 1):
    """The tiny SD pipeline; with 2 layers per block (SD's count) its UNet is rebuilt to match."""
    pipe = make_pipe()
    if layers_per_block != 1:
        torch.manual_seed(3)
        unet = UNet2DConditionModel(**tiny_unet_config(layers_per_block=layers_per_block)).eval()
        pipe = StableDiffusionPipeline(**{**pipe.components, "unet": unet})
        pipe.set_progress_bar_config(disable=True)
    return pipe


def _images(pipe, steps: int = 10) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return pipe(
            ["a photo of a shirt"], num_inference_steps=steps, generator=g, output_type="pt"
        ).images


def _package_images(pipe, helper, steps: int = 10) -> torch.Tensor:
    helper.enable()
    try:
        return _images(pipe, steps)
    finally:
        helper.disable()


def _our_images(pipe, config: DeepCacheConfig, steps: int = 10) -> torch.Tensor:
    apply_deep_cache(pipe, config)
    try:
        return _images(pipe, steps)
    finally:
        remove_deep_cache(pipe)


@pytest.mark.parametrize(
    "layers_per_block, interval, branch",
    [(1, 3, 0), (1, 2, 1), (1, 4, 4), (2, 3, 0), (2, 5, 2), (2, 2, 4), (2, 3, 7)],
)
def test_uniform_matches_the_package(make_pipe, layers_per_block, interval, branch):
    pipe = _pipe(make_pipe, layers_per_block)
    plain = _images(pipe)
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    theirs = _package_images(pipe, helper)
    ours = _our_images(pipe, DeepCacheConfig(cache_interval=interval, cache_branch_id=branch))
    assert (theirs - plain).abs().max() > 1e-3  # the package does cache here
    assert (ours - theirs).abs().max() <= 1e-4


def _package_function(name: str):
    """A top-level function of the package's SD pipeline fork, read from the installed source
    (importing the fork fails: it imports names diffusers has since removed)."""
    path = Path(importlib.util.find_spec("DeepCache").origin).parent / "sd" / "pipeline_stable_diffusion.py"
    tree = ast.parse(path.read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    namespace = {"np": np}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), str(path), "exec"), namespace)
    return namespace[name]


def _package_nonuniform_steps(num_steps, interval, center, pow):
    """The fork pipeline's full steps for ``uniform=False`` (its call, step 7)."""
    num_full = num_steps // interval + (num_steps % interval != 0)
    steps, _ = _package_function("sample_from_quad_center")(
        num_steps, num_full, center=center, pow=pow
    )
    return sorted(int(s) for s in steps)


@pytest.mark.parametrize(
    "num_steps, interval, center, pow",
    [(50, 5, 15, 1.4), (50, 3, 15, 1.4), (50, 10, 20, 1.6), (20, 3, 5, 1.4), (10, 3, 2, 1.3), (30, 4, 0, 1.5)],
)
def test_nonuniform_full_steps_are_the_packages(num_steps, interval, center, pow):
    cfg = DeepCacheConfig(interval, 0, skip_mode="non-uniform", pow=pow, center=center)
    assert cfg.key_steps_for(num_steps) == _package_nonuniform_steps(num_steps, interval, center, pow)


def test_nonuniform_schedule_without_a_fit_says_what_to_change():
    with pytest.raises(ValueError, match="finds no exponent"):
        nonuniform_full_steps(10, 9, center=8, pow=1.1)


class _HelperAtSteps(DeepCacheSDHelper):
    """The package's layer cut at a given set of full steps (its non-uniform pipeline's role)."""

    def __init__(self, pipe, full_steps):
        super().__init__(pipe=pipe)
        self.full_steps = set(full_steps)

    def is_skip_step(self, block_i, layer_i, blocktype="down"):
        if self.cur_timestep in self.full_steps:
            return False
        return super().is_skip_step(block_i, layer_i, blocktype)


@pytest.mark.parametrize("layers_per_block, interval, branch", [(1, 3, 0), (2, 4, 1)])
def test_nonuniform_matches_the_package(make_pipe, layers_per_block, interval, branch):
    steps, center, pow = 12, 3, 1.4
    pipe = _pipe(make_pipe, layers_per_block)
    full = _package_nonuniform_steps(steps, interval, center, pow)
    assert full != list(range(0, steps, interval))  # a genuinely different schedule
    helper = _HelperAtSteps(pipe, full)
    helper.set_params(cache_interval=interval, cache_branch_id=branch, skip_mode="non-uniform")
    theirs = _package_images(pipe, helper, steps)
    cfg = DeepCacheConfig(interval, branch, skip_mode="non-uniform", pow=pow, center=center)
    ours = _our_images(pipe, cfg, steps)
    assert (ours - theirs).abs().max() <= 1e-4


def test_branch_0_runs_only_the_outermost_layers():
    unet = UNet2DConditionModel(**tiny_unet_config(layers_per_block=2))
    cached = cached_module_names(unet, DeepCacheConfig(cache_branch_id=0))
    # Every down block, the mid block and all up blocks but the last are reused whole; in the last
    # up block only its output-side layer (resnet 2 + attention 2) runs.
    assert cached == [
        "down_blocks.0", "down_blocks.1", "down_blocks.2", "mid_block", "up_blocks.0",
        "up_blocks.1", "up_blocks.2.resnets.0", "up_blocks.2.attentions.0",
        "up_blocks.2.resnets.1", "up_blocks.2.attentions.1",
    ]  # fmt: skip
    deeper = cached_module_names(unet, DeepCacheConfig(cache_branch_id=4))  # block 1, layer 1
    assert "down_blocks.0" not in deeper and "down_blocks.1.resnets.1" in deeper
    assert "down_blocks.1.resnets.0" not in deeper and "up_blocks.1.resnets.0" in deeper
    assert "up_blocks.1.resnets.1" not in deeper and "up_blocks.2.resnets.0" not in deeper


@pytest.mark.parametrize("branch", [0, 4])
def test_interval_1_is_the_plain_unet(make_pipe, branch):
    pipe = make_pipe()
    ref = sample_latents(pipe)
    apply_deep_cache(pipe, DeepCacheConfig(cache_interval=1, cache_branch_id=branch))
    out = sample_latents(pipe)
    remove_deep_cache(pipe)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def _hooked_modules(module: torch.nn.Module) -> list[str]:
    return [n for n, m in module.named_modules() if hasattr(m, "_diffusers_hook")]


@pytest.mark.parametrize("interval, branch", [(5, 0), (3, 1)])
def test_counters_reuse_and_exact_removal(make_pipe, interval, branch):
    pipe = make_pipe("dpm++")
    ref = sample_latents(pipe, steps=10)
    cfg = DeepCacheConfig(cache_interval=interval, cache_branch_id=branch)
    apply_deep_cache(pipe, cfg)
    deep_calls, live_calls = [], []
    handles = [  # a leaf inside a reused block, and the output-side resnet that always runs
        pipe.unet.down_blocks[1].resnets[0].register_forward_hook(lambda *a: deep_calls.append(1)),
        pipe.unet.up_blocks[-1].resnets[-1].register_forward_hook(lambda *a: live_calls.append(1)),
    ]
    first = sample_latents(pipe, steps=10)
    again = sample_latents(pipe, steps=10)  # state resets per run: the same result
    stats = get_cache_stats(pipe)
    for h in handles:
        h.remove()
    remove_deep_cache(pipe)
    full = len(cfg.key_steps_for(10))
    assert full == math.ceil(10 / interval)
    assert stats.runs == 2 and stats.full_forwards == 2 * full
    assert stats.partial_forwards == 2 * (10 - full)
    assert len(deep_calls) == 2 * full and len(live_calls) == 2 * 10
    assert torch.equal(first, again) and (first - ref).abs().max() > 1e-4
    assert _hooked_modules(pipe.unet) == [] and "forward" not in vars(pipe.unet)
    assert all("forward" not in vars(m) for m in pipe.unet.modules())
    assert torch.equal(sample_latents(pipe, steps=10), ref)


def test_bare_unet_loop_matches_the_pipeline(make_pipe):
    """`denoise` on a bare UNet announces its runs, so the cache works outside a pipeline too."""
    pipe = make_pipe()
    unet, sched = pipe.unet, pipe.scheduler
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 16, 16, generator=g)
    cond, null = torch.randn(2, 1, 16, 8, generator=g).unbind(0)
    ref = denoise(unet, sched, x, cond, null, steps=10, guidance_scale=7.5)
    apply_deep_cache(unet, DeepCacheConfig(cache_interval=5, cache_branch_id=0))
    out = denoise(unet, sched, x, cond, null, steps=10, guidance_scale=7.5)
    stats = get_cache_stats(unet)
    remove_deep_cache(unet)
    assert stats.full_forwards == 2 and stats.partial_forwards == 8
    assert (out - ref).abs().max() > 1e-4


def test_labels_and_schedules():
    assert DeepCacheConfig(5, 0).label == "DeepCache-N5-b0"
    cfg = DeepCacheConfig(5, 2, skip_mode="non-uniform", pow=1.4, center=15)
    assert cfg.label == "DeepCache-N5-b2-nonuniform-c15-p1.4"
    assert (cfg.cache_block_id, cfg.cache_layer_id) == (0, 2)
    assert DeepCacheConfig(5, 0).key_steps_for(12) == [0, 5, 10]
    assert DeepCacheConfig(1, 0, skip_mode="non-uniform").key_steps_for(4) == [0, 1, 2, 3]
    assert cfg.key_steps_for(50) == [0, 5, 9, 13, 17, 21, 26, 31, 37, 43]


def test_bad_settings_are_refused(make_pipe):
    with pytest.raises(ValueError, match="cache_interval must be an integer >= 1"):
        DeepCacheConfig(cache_interval=0)
    with pytest.raises(ValueError, match="unknown skip_mode"):
        DeepCacheConfig(skip_mode="center")
    with pytest.raises(ValueError, match="pow must be > 1"):
        DeepCacheConfig(skip_mode="non-uniform", pow=1.0)
    with pytest.raises(ValueError, match="use cache_branch_id < 9"):
        apply_deep_cache(make_pipe(), DeepCacheConfig(cache_branch_id=9))
