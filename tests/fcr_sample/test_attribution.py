"""fcr_sample.attribution: the cache-error diagnostic against the real caches' own steps."""

import pytest
import torch
from fcr_sample import (
    DeepCacheConfig,
    EncoderCacheConfig,
    apply_deep_cache,
    apply_encoder_cache,
    attribute_cache_error,
    denoise,
    remove_deep_cache,
    remove_encoder_cache,
    start_sampling_run,
)
from fcr_sample.testing import tiny_scheduler, tiny_unet

# slow: one trajectory per served step (propagation) on several caches
pytestmark = pytest.mark.slow

STEPS, GUIDANCE = 6, 2.0
FD3 = EncoderCacheConfig(stride=3)
DC3 = DeepCacheConfig(cache_interval=3, cache_branch_id=0)


def _unet():
    """Two levels, 4/8 channels, an 8×8 latent: the smallest UNet with a cross-attention up block."""
    return tiny_unet(
        0,
        block_out_channels=(4, 8),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=2,
        sample_size=8,
    )


@pytest.fixture(scope="module")
def setup():
    g = torch.Generator().manual_seed(1)
    x_T = torch.randn(1, 4, 8, 8, generator=g)
    cond, null = torch.randn(1, 5, 8, generator=g), torch.randn(1, 5, 8, generator=g)
    return _unet(), x_T, cond, null


def _attribute(setup, cache, steps=STEPS, guidance_scale=GUIDANCE, **kwargs):
    unet, x_T, cond, null = setup
    return attribute_cache_error(unet, tiny_scheduler("ddim"), x_T, cond, null, cache=cache,
                                 steps=steps, guidance_scale=guidance_scale, **kwargs)


@pytest.fixture(scope="module")
def measured(setup):
    """Per cache: every step measured (key steps too), with the propagation."""
    return {c.label: _attribute(setup, c, propagation=True, measure_key_steps=True)
            for c in (FD3, DC3)}


def _rel(a, ref):
    return float((a - ref).double().pow(2).sum() / ref.double().pow(2).sum())


def _guided(unet, sched, x, t, cond, null):
    inp = sched.scale_model_input(x, t)
    u, c = unet(torch.cat([inp, inp]), t, torch.cat([null, cond])).sample.chunk(2)
    return u + GUIDANCE * (c - u)


def _reference(setup, apply, remove, config, propagation):
    """The uncached trajectory's states and ε, the real cache's ε on those states, and (with
    ``propagation``) for every step the final sample when only that step takes the real cache's ε."""
    unet, x_T, cond, null = setup
    sched = tiny_scheduler("ddim")
    states = [x_T * 1.0]
    with torch.no_grad():
        final = denoise(unet, sched, x_T, cond, null, steps=STEPS, guidance_scale=GUIDANCE,
                        callback=lambda info: states.append(info["x"].clone()))
        ts = sched.timesteps
        fresh = [_guided(unet, sched, x, t, cond, null) for x, t in zip(states, ts, strict=False)]
        apply(unet, config)
        try:
            start_sampling_run(unet, ts)
            cached = [_guided(unet, sched, x, t, cond, null) for x, t in zip(states, ts, strict=False)]
        finally:
            remove(unet)
        finals = []
        for i in range(STEPS if propagation else 0):
            x = sched.step(cached[i], ts[i], states[i]).prev_sample
            for j in range(i + 1, STEPS):
                x = sched.step(_guided(unet, sched, x, ts[j], cond, null), ts[j], x).prev_sample
            finals.append(x)
    return sched, states, fresh, cached, finals, final


def _x0(sched, x, t, eps):
    a = sched.alphas_cumprod[int(t)]
    return (x - (1 - a).sqrt() * eps) / a.sqrt()


@pytest.mark.parametrize(
    "config, apply, remove, propagation",
    [(FD3, apply_encoder_cache, remove_encoder_cache, True),
     (DC3, apply_deep_cache, remove_deep_cache, True),
     (DeepCacheConfig(cache_interval=3, cache_branch_id=1), apply_deep_cache, remove_deep_cache, False),
     (DeepCacheConfig(cache_interval=2, cache_branch_id=3), apply_deep_cache, remove_deep_cache, False)],
    ids=["FD-3", "DeepCache-b0", "DeepCache-b1", "DeepCache-b3"],
)
def test_all_stale_is_the_real_cache_step_and_its_propagation(setup, config, apply, remove,
                                                               propagation):
    result = _attribute(setup, config, propagation=propagation)
    sched, states, fresh, cached, finals, final = _reference(setup, apply, remove, config,
                                                             propagation)
    cached_steps = [i for i in range(STEPS) if i not in config.key_steps_for(STEPS)]
    assert [s.step for s in result.steps] == cached_steps  # nothing else, no key step
    for s in result.steps:
        i, t = s.step, sched.timesteps[s.step]
        assert s.key_step == max(k for k in result.key_steps if k <= i)
        assert s.eps_error > 1e-6  # the real cache does differ here, so the match is informative
        assert s.eps_error == pytest.approx(_rel(cached[i], fresh[i]), rel=1e-4)
        x0_real = _x0(sched, states[i], t, cached[i])
        assert s.x0_error == pytest.approx(_rel(x0_real, _x0(sched, states[i], t, fresh[i])), rel=1e-3)
        if propagation:
            assert s.final_error == pytest.approx(_rel(finals[i], final), rel=1e-2, abs=1e-12)
        else:
            assert s.final_error is None


@pytest.mark.parametrize("config", [EncoderCacheConfig(stride=1), DeepCacheConfig(1, 0)],
                         ids=["FD-1", "DeepCache-N1"])
def test_nothing_is_stale_at_stride_1(setup, config):
    assert _attribute(setup, config, propagation=True).steps == ()
    checked = _attribute(setup, config, steps=4, propagation=True, measure_key_steps=True)
    rows = checked.to_rows()
    assert [s.step for s in checked.steps] == list(range(4))
    assert {r["quantity"] for r in rows} >= {"eps_error", "x0_error", "final_error",
                                            "only_stale_error", "only_fresh_error", "change"}
    assert all(r["value"] == 0.0 for r in rows if r["quantity"] not in ("key_step", "energy"))
    assert not [r for r in rows if r["quantity"] == "decoder_gain"]  # 0 / 0 is no gain


@pytest.mark.parametrize("label", [FD3.label, DC3.label])
def test_key_steps_are_exactly_zero_and_served_steps_are_not(measured, label):
    result = measured[label]
    assert result.key_steps == (0, 3)
    for s in result.steps:
        values = [s.eps_error, s.x0_error, s.change, s.relative_change, s.final_error]
        values += [v for f in s.features for v in (f.only_stale_error, f.only_fresh_error,
                                                    f.change, f.relative_change)]
        if s.step in result.key_steps:  # every feature fresh: nothing may move, not even the end
            assert values == [0.0] * len(values)
            assert s.decoder_gain is None
        else:
            assert min(values[:5]) > 0
            assert all(f.change > 0 and f.decoder_gain > 0 for f in s.features)


def test_fd_attributes_to_each_encoder_group_and_deep_cache_to_its_one_feature(measured):
    fd, dc = measured[FD3.label], measured[DC3.label]
    assert [f.feature for f in fd.steps[1].features] == [
        "conv_in", "down_blocks.0", "down_blocks.1", "mid_block"]
    served = fd.steps[1]
    # all stale but one feature must stay below all stale: freshening a feature removes its part
    assert all(f.only_fresh_error < served.eps_error for f in served.features)
    (feature,) = dc.steps[1].features
    assert feature.feature == "up_blocks.1.attentions.0"  # feeds the last up block's last resnet
    assert feature.only_stale_error == dc.steps[1].eps_error  # one feature: it is the whole error
    assert feature.only_fresh_error == 0.0  # its only feature fresh = nothing stale


def test_rows_are_plain_and_complete(measured):
    result = measured[FD3.label]
    rows = result.to_rows()
    assert all(set(r) == {"step", "timestep", "feature", "quantity", "value"} for r in rows)
    assert all(isinstance(r["value"], float) for r in rows)
    per_step = {(r["step"], r["feature"], r["quantity"]) for r in rows}
    assert len(per_step) == len(rows)  # one row per (step, feature, quantity)
    s = result.steps[1]
    assert {(1, "all", "eps_error"), (1, "conv_in", "only_stale_error")} <= per_step
    row = next(r for r in rows if r["step"] == 1 and r["quantity"] == "eps_error")
    assert (row["timestep"], row["value"]) == (s.timestep, s.eps_error)


def test_the_unet_is_left_exactly_as_it_was(setup):
    unet, x_T, cond, _ = setup
    with torch.no_grad():
        before = unet(x_T, 500, cond).sample
        for config, guidance in ((FD3, GUIDANCE), (DC3, 1.0)):  # with CFG and without
            result = _attribute(setup, config, steps=3, guidance_scale=guidance)
            assert [s.step for s in result.steps] == [1, 2]
            assert all(s.eps_error > 0 for s in result.steps)
            assert not [r for r in result.to_rows() if r["quantity"] == "final_error"]
            assert not hasattr(unet, "_diffusers_hook") and "forward" not in unet.__dict__
            assert not any(m._forward_hooks or m._forward_pre_hooks for m in unet.modules())
            assert torch.equal(unet(x_T, 500, cond).sample, before)
    apply_encoder_cache(unet, FD3)  # and a cache still applies
    remove_encoder_cache(unet)


def test_bad_input_is_refused_clearly(setup):
    unet, x_T, cond, null = setup
    sched = tiny_scheduler("ddim")
    apply_encoder_cache(unet, FD3)
    try:
        with pytest.raises(ValueError, match="remove it first"):
            attribute_cache_error(unet, sched, x_T, cond, null, cache=FD3, steps=STEPS)
    finally:
        remove_encoder_cache(unet)
    with pytest.raises(TypeError, match="EncoderCacheConfig or a DeepCacheConfig"):
        attribute_cache_error(unet, sched, x_T, cond, null, cache="FD-3", steps=STEPS)
    with pytest.raises(ValueError, match="prior_noise_alpha=0"):
        attribute_cache_error(unet, sched, x_T, cond, null, steps=STEPS,
                              cache=EncoderCacheConfig(stride=3, prior_noise_alpha=0.003))
    with pytest.raises(ValueError, match="needs the unconditional states"):
        attribute_cache_error(unet, sched, x_T, cond, cache=FD3, steps=STEPS, guidance_scale=2.0)
