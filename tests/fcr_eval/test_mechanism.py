"""σ²_Δ against a direct recomputation through fcr_sample.features.encoder_features."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler
from fcr_eval.mechanism import encoder_feature_variance, mean_variance
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
