"""σ²_Δ against a direct recomputation through fcr_sample.features.encoder_features."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import DDPMScheduler
from fcr_eval.metrics.mechanism import (
    cache_range_consistency,
    encoder_feature_consistency,
    encoder_feature_variance,
    mean_variance,
)
from fcr_sample.features import encoder_features
from fcr_sample.testing import tiny_unet


@pytest.fixture(scope="module")
def setup():
    unet = tiny_unet(0).eval()
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(4, 4, 16, 16, generator=g)
    ehs = torch.randn(4, 5, 8, generator=g)
    return unet, z0, ehs, DDPMScheduler()


def test_matches_direct_recomputation(setup):
    unet, z0, ehs, sched = setup
    t = torch.tensor([10, 200, 500, 900])
    rows = encoder_feature_variance(unet, z0, ehs, sched, deltas=[1, 3], timesteps=t,
                                    generator=torch.Generator().manual_seed(1), batch_size=3)
    eps = torch.randn(z0.shape, generator=torch.Generator().manual_seed(1))  # same draw as inside
    with torch.no_grad():
        f_t = encoder_features(unet, sched.add_noise(z0, eps, t), t, ehs)
        for d in (1, 3):
            f_s = encoder_features(unet, sched.add_noise(z0, eps, t - d), t - d, ehs)
            diffs = {k: (f_t[k] - f_s[k]).double() for k in f_t}
            expected_all = torch.cat([v.reshape(-1) for v in diffs.values()]).var(unbiased=False)
            got = {(r.block, r.delta): r for r in rows}
            # float32 UNet passes in batches of 3 (inside) vs 4 (here): differences at Δ = 1 are
            # small, so their variance carries ~1e-6 relative noise that depends on the thread count
            assert got[("all", d)].variance == pytest.approx(float(expected_all), rel=1e-5)
            assert got[("all", d)].n == 4
            for k, v in diffs.items():
                assert got[(k, d)].variance == pytest.approx(float(v.var(unbiased=False)), rel=1e-5, abs=1e-12)


def test_conv_in_variance_grows_with_delta_and_bad_timesteps_fail(setup):
    unet, z0, ehs, sched = setup
    rows = encoder_feature_variance(unet, z0, ehs, sched, delta_max=3, generator=torch.Generator().manual_seed(0))
    conv = [r.variance for r in sorted(rows, key=lambda r: r.delta) if r.block == "conv_in"]
    # conv_in is linear in x (no time input), so its difference grows with the noise gap.
    assert conv[0] < conv[1] < conv[2]
    assert mean_variance(rows) > 0
    with pytest.raises(ValueError, match=r"timesteps must be"):
        encoder_feature_variance(unet, z0, ehs, sched, delta_max=3, timesteps=torch.tensor([1, 2, 3, 4]))


def test_scaling_a_feature_map_by_c_scales_sigma2_by_c2_but_not_the_scale_free_ratio(setup):
    unet, z0, ehs, sched = setup
    scaled = copy.deepcopy(unet)
    with torch.no_grad():  # conv_in is linear in x (no time input): scaling its weights scales its output
        scaled.conv_in.weight.mul_(3.0)
        scaled.conv_in.bias.mul_(3.0)
    t = torch.tensor([300, 500, 700, 900])
    kw = dict(deltas=[1, 2], timesteps=t, delta_unit="sampler_steps", sampler_steps=10)
    base = {(r.block, r.delta): r for r in encoder_feature_consistency(unet, z0, ehs, sched, **kw,
                                                                        generator=torch.Generator().manual_seed(2))}
    big = {(r.block, r.delta): r for r in encoder_feature_consistency(scaled, z0, ehs, sched, **kw,
                                                                       generator=torch.Generator().manual_seed(2))}
    for d in (1, 2):
        a, b = base[("conv_in", d)], big[("conv_in", d)]
        assert b.variance == pytest.approx(9 * a.variance, rel=1e-5)
        assert b.energy == pytest.approx(9 * a.energy, rel=1e-5)
        assert b.scale_free == pytest.approx(a.scale_free, rel=1e-5)
        assert a.scale_free == pytest.approx(a.variance / a.energy)


def test_sampler_step_unit_is_k_times_T_over_steps_timesteps(setup):
    unet, z0, ehs, sched = setup  # T = 1000
    t = torch.tensor([300, 500, 700, 900])
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    steps = encoder_feature_consistency(unet, z0, ehs, sched, delta_max=3, delta_unit="sampler_steps",
                                        sampler_steps=10, timesteps=t, generator=g())
    literal = encoder_feature_consistency(unet, z0, ehs, sched, deltas=[100, 200, 300], timesteps=t, generator=g())
    assert {(r.delta, r.delta_timesteps, r.unit) for r in steps if r.block == "all"} == {
        (1, 100, "sampler_steps"), (2, 200, "sampler_steps"), (3, 300, "sampler_steps")}
    by_t = {(r.block, r.delta_timesteps): r.variance for r in literal}
    for r in steps:
        assert r.variance == pytest.approx(by_t[(r.block, r.delta_timesteps)], rel=1e-6)
    # The store's form: Δ in timesteps, same variances.
    stats = encoder_feature_variance(unet, z0, ehs, sched, delta_max=3, delta_unit="sampler_steps", sampler_steps=10,
                                     timesteps=t, generator=g())
    assert sorted((s.block, s.delta, s.variance) for s in stats) == sorted(
        (r.block, r.delta_timesteps, r.variance) for r in steps)


def test_cache_range_next_to_the_literal_range(setup):
    unet, z0, ehs, sched = setup
    rows = cache_range_consistency(unet, z0, ehs, sched, stride=4, sampler_steps=20, literal_delta_max=3,
                                   generator=torch.Generator().manual_seed(0))
    alls = [(r.unit, r.delta, r.delta_timesteps) for r in rows if r.block == "all"]
    assert alls == [("sampler_steps", k, 50 * k) for k in range(1, 5)] + [("timesteps", k, k) for k in range(1, 4)]
    assert all(r.energy > 0 for r in rows)
    cache = [r.scale_free for r in rows if r.block == "all" and r.unit == "sampler_steps"]
    lit = [r.scale_free for r in rows if r.block == "all" and r.unit == "timesteps"]
    assert min(cache) > max(lit)  # 50–200 timesteps apart is far less consistent than 1–3
    with pytest.raises(ValueError, match="needs sampler_steps"):
        encoder_feature_consistency(unet, z0, ehs, sched, delta_unit="sampler_steps")
    with pytest.raises(ValueError, match="does not fit"):
        encoder_feature_consistency(unet, z0, ehs, sched, delta_max=20, delta_unit="sampler_steps", sampler_steps=20)
    with pytest.raises(ValueError, match="do not pass deltas"):
        cache_range_consistency(unet, z0, ehs, sched, stride=4, sampler_steps=20, deltas=[1])
