import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler
from fcr_sample.features import encoder_features
from fcr_train.loss import (
    FCRConfig,
    denoise_target,
    fcr_loss,
    feature_distance,
    sample_timesteps,
    sampler_step_timesteps,
)


def _draws(x0, T=100, delta_max=10, seed=3):
    g = torch.Generator().manual_seed(seed)
    t, d = sample_timesteps(x0.shape[0], T, delta_max, generator=g)
    return torch.randn(x0.shape, generator=g), t, d


def _plain_loss(unet, scheduler, x0, text, noise, t):
    pred = unet(scheduler.add_noise(x0, noise, t), t, text).sample
    return F.mse_loss(pred, denoise_target(scheduler, x0, noise, t))


def test_lambda_zero_is_plain_denoising_loss(tiny_unet, scheduler, batch):
    x0, text = batch
    noise, t, d = _draws(x0)
    out = fcr_loss(tiny_unet, scheduler, x0, text, FCRConfig(lam=0.0), noise=noise, timesteps=t, deltas=d)
    plain = _plain_loss(tiny_unet, scheduler, x0, text, noise, t)
    assert torch.equal(out.loss, plain)
    assert out.fcr.item() == 0.0 and out.per_block == {}


@pytest.mark.parametrize("batched", [True, False])
def test_denoise_term_unchanged_by_fcr_and_batching(tiny_unet, scheduler, batch, batched):
    x0, text = batch
    noise, t, d = _draws(x0)
    cfg = FCRConfig(lam=0.5, batched=batched)
    out = fcr_loss(tiny_unet, scheduler, x0, text, cfg, noise=noise, timesteps=t, deltas=d)
    plain = _plain_loss(tiny_unet, scheduler, x0, text, noise, t)
    torch.testing.assert_close(out.denoise, plain, rtol=1e-5, atol=1e-6)
    # the FCR term is the mean per-block distance between Enc(x_t) and Enc(x_{t-delta})
    ft = encoder_features(tiny_unet, scheduler.add_noise(x0, noise, t), t, text)
    fs = encoder_features(tiny_unet, scheduler.add_noise(x0, noise, t - d), t - d, text)
    expect = torch.stack([(ft[n] - fs[n]).pow(2).mean() for n in ft]).mean()
    torch.testing.assert_close(out.fcr, expect, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(out.loss, plain + 0.5 * expect, rtol=1e-4, atol=1e-6)
    assert set(out.per_block) == set(ft)


def _grads(unet, loss):
    unet.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad for n, p in unet.named_parameters()}


def test_fcr_gradient_reaches_encoder_not_decoder(tiny_unet, scheduler, batch):
    x0, text = batch
    noise, t, d = _draws(x0)
    out = fcr_loss(tiny_unet, scheduler, x0, text, FCRConfig(lam=1.0), noise=noise, timesteps=t, deltas=d)
    grads = _grads(tiny_unet, out.fcr)
    enc = [n for n in grads if n.startswith(("conv_in", "down_blocks", "mid_block"))]
    dec = [n for n in grads if n.startswith(("up_blocks", "conv_out", "conv_norm_out"))]
    assert enc and dec
    assert all(grads[n] is not None and grads[n].abs().sum() > 0 for n in ("conv_in.weight", "mid_block.resnets.0.conv1.weight"))
    assert sum(float(grads[n].abs().sum()) for n in enc if grads[n] is not None) > 0
    assert all(grads[n] is None or float(grads[n].abs().sum()) == 0.0 for n in dec)


def test_block_subset_limits_gradient(tiny_unet, scheduler, batch):
    x0, text = batch
    noise, t, d = _draws(x0)
    out = fcr_loss(tiny_unet, scheduler, x0, text, FCRConfig(lam=1.0, blocks=("conv_in",)), noise=noise, timesteps=t, deltas=d)
    assert list(out.per_block) == ["conv_in"]
    grads = _grads(tiny_unet, out.fcr)
    assert grads["conv_in.weight"].abs().sum() > 0
    assert all(g is None or float(g.abs().sum()) == 0 for n, g in grads.items() if n.startswith("down_blocks"))


@pytest.mark.parametrize("batched", [True, False])
def test_stop_grad_blocks_second_branch(tiny_unet, scheduler, batch, batched):
    x0, text = batch
    noise, t, d = _draws(x0)
    kw = dict(noise=noise, timesteps=t, deltas=d)
    sg = _grads(tiny_unet, fcr_loss(tiny_unet, scheduler, x0, text, FCRConfig(lam=1.0, stop_grad=True, batched=batched), **kw).fcr)
    full = _grads(tiny_unet, fcr_loss(tiny_unet, scheduler, x0, text, FCRConfig(lam=1.0, stop_grad=False, batched=batched), **kw).fcr)
    # reference: only the x_t branch carries gradient
    ft = encoder_features(tiny_unet, scheduler.add_noise(x0, noise, t), t, text)
    with torch.no_grad():
        fs = encoder_features(tiny_unet, scheduler.add_noise(x0, noise, t - d), t - d, text)
    ref = _grads(tiny_unet, torch.stack([(ft[n] - fs[n]).pow(2).mean() for n in ft]).mean())
    w = "conv_in.weight"
    torch.testing.assert_close(sg[w], ref[w], rtol=1e-4, atol=1e-8)
    assert not torch.allclose(full[w], ref[w], rtol=1e-3, atol=1e-8)


def test_v_prediction_target(tiny_unet, batch):
    x0, text = batch
    sched = DDPMScheduler(num_train_timesteps=100, prediction_type="v_prediction")
    noise, t, d = _draws(x0)
    out = fcr_loss(tiny_unet, sched, x0, text, FCRConfig(lam=0.1), noise=noise, timesteps=t, deltas=d)
    pred = tiny_unet(sched.add_noise(x0, noise, t), t, text).sample
    torch.testing.assert_close(out.denoise, F.mse_loss(pred, sched.get_velocity(x0, noise, t)), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out.denoise, F.mse_loss(pred, noise))


def test_timestep_sampling_respects_delta():
    g = torch.Generator().manual_seed(0)
    t, d = sample_timesteps(5000, 1000, 10, generator=g)
    assert int(d.min()) == 1 and int(d.max()) == 10
    assert bool((t >= d).all()) and int(t.max()) <= 999 and int((t - d).min()) >= 0
    assert int(t.max()) >= 990  # the top of U(delta, T) is reached
    t, d = sample_timesteps(5000, 1000, 10, generator=g, delta_scale=20)  # Δ in DDIM-50 steps
    assert set(d.unique().tolist()) == set(range(20, 201, 20)) and bool((t >= d).all())
    with pytest.raises(ValueError, match="delta_scale"):
        sample_timesteps(4, 1000, 10, delta_scale=100)
    t0, d0 = sample_timesteps(100, 1000, 10, generator=g, fcr=False)
    assert bool((d0 == 0).all())


def test_distances():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 3, 5, 5, generator=g)
    # plain MSE can be lowered by shrinking features; the relative and cosine ones cannot
    assert feature_distance(0.1 * a, 0.1 * b, "mse") < feature_distance(a, b, "mse")
    torch.testing.assert_close(feature_distance(0.1 * a, 0.1 * b, "relative_mse"), feature_distance(a, b, "relative_mse"))
    torch.testing.assert_close(feature_distance(0.1 * a, 0.1 * b, "cosine"), feature_distance(a, b, "cosine"))
    assert float(feature_distance(a, 3 * a, "cosine")) == pytest.approx(0.0, abs=1e-6)
    assert float(feature_distance(a, a, "relative_mse")) == 0.0


def test_bad_config_errors(tiny_unet, scheduler, batch):
    with pytest.raises(ValueError, match="distance"):
        FCRConfig(distance="l1")
    with pytest.raises(ValueError, match="lam"):
        FCRConfig(lam=-1)
    with pytest.raises(ValueError, match="delta_max"):
        FCRConfig(delta_max=0)
    x0, text = batch
    with pytest.raises(ValueError, match="block group"):
        fcr_loss(tiny_unet, scheduler, x0, text, FCRConfig(blocks="middle"))
    with pytest.raises(ValueError, match=">= its delta"):
        fcr_loss(tiny_unet, scheduler, x0, text, FCRConfig(), timesteps=torch.tensor([0, 1, 2]), deltas=torch.tensor([1, 1, 1]))


def test_delta_in_sampler_steps_is_k_times_T_over_steps():
    cfg = FCRConfig(delta_unit="sampler_steps", sampler_steps=20, delta_max=10)
    scale = cfg.timesteps_per_delta(1000)
    assert scale == 50
    t, d = sample_timesteps(5000, 1000, cfg.delta_max, generator=torch.Generator().manual_seed(0), delta_scale=scale)
    assert set(d.unique().tolist()) == {50 * k for k in range(1, 11)}  # Δ ∈ {k · T/steps}, k = 1…Δ_max, exactly
    assert bool((t >= d).all()) and int(t.max()) <= 999
    # One unit is exactly the spacing of the sampler's own timesteps (DDIM, "leading" spacing).
    for steps in (20, 30, 50):
        sched = DDIMScheduler(num_train_timesteps=1000)
        sched.set_timesteps(steps)
        gaps = set((sched.timesteps[:-1] - sched.timesteps[1:]).tolist())
        assert gaps == {sampler_step_timesteps(1000, steps)}
    # Old configs mean the same: Δ in timesteps, delta_scale by hand.
    assert FCRConfig().timesteps_per_delta(1000) == 1 and FCRConfig(delta_scale=20).timesteps_per_delta(1000) == 20


def test_fcr_loss_draws_deltas_in_sampler_steps(tiny_unet, scheduler, batch):
    x0, text = batch
    cfg = FCRConfig(lam=0.1, delta_unit="sampler_steps", sampler_steps=10, delta_max=None, stride=4)
    assert cfg.delta_max == 4  # Δ_max defaults to the stride it serves
    out = fcr_loss(tiny_unet, scheduler, x0, text, cfg, generator=torch.Generator().manual_seed(0))
    assert set(out.deltas.tolist()) <= {10, 20, 30, 40} and bool((out.timesteps >= out.deltas).all())


def test_sampler_unit_config_errors():
    with pytest.raises(ValueError, match="needs sampler_steps"):
        FCRConfig(delta_unit="sampler_steps")
    with pytest.raises(ValueError, match="leave it at 1"):
        FCRConfig(delta_unit="sampler_steps", sampler_steps=20, delta_scale=50)
    with pytest.raises(ValueError, match="set stride too"):
        FCRConfig(delta_max=None)
    with pytest.raises(ValueError, match="delta_unit must be one of"):
        FCRConfig(delta_unit="steps")
    with pytest.raises(ValueError, match="num_inference_steps"):
        sampler_step_timesteps(1000, 0)


def test_scale_free_distances_give_no_gradient_towards_shrinking():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 3, 5, 5, generator=g)
    for kind, shrink_pays in (("mse", True), ("relative_mse", False), ("cosine", False)):
        c = torch.tensor(1.0, requires_grad=True)
        feature_distance(c * a, c * b, kind).backward()
        # d/dc at c = 1: positive for MSE (shrinking lowers it), zero for the scale-free ones.
        if shrink_pays:
            assert float(c.grad) > 0.1
        else:
            assert abs(float(c.grad)) < 1e-5, kind
        for shrunk in (0.5, 0.1):
            lower = feature_distance(shrunk * a, shrunk * b, kind) < feature_distance(a, b, kind) - 1e-6
            assert bool(lower) == shrink_pays, (kind, shrunk)
