"""Robustness protocols: schedule perturbation statistics, FGSM constraints, resizing."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from fcr_eval.metrics.robustness import (
    RobustnessProtocol,
    fgsm_initial_latent,
    perturb_scheduler,
    perturbed_alphas_cumprod,
    resize_images,
)


def _sigma(ac):
    return ((1 - ac) / ac).sqrt()


def test_schedule_perturbation_is_multiplicative_gaussian():
    s = DDIMScheduler()
    p = perturb_scheduler(s, std=0.05, seed=0)
    ratio = _sigma(p.alphas_cumprod.double()) / _sigma(s.alphas_cumprod.double()) - 1
    assert abs(float(ratio.mean())) < 0.01 and float(ratio.std()) == pytest.approx(0.05, rel=0.1)
    assert torch.equal(s.alphas_cumprod, DDIMScheduler().alphas_cumprod)  # original untouched
    assert torch.equal(perturb_scheduler(s, 0.05, seed=0).alphas_cumprod, p.alphas_cumprod)  # seeded
    assert torch.allclose(perturbed_alphas_cumprod(s.alphas_cumprod, 0.0), s.alphas_cumprod)


@pytest.mark.parametrize("cls", [DDIMScheduler, DPMSolverMultistepScheduler])
def test_perturbed_scheduler_changes_the_step(cls):
    s, p = cls(), perturb_scheduler(cls(), std=0.05, seed=1)
    s.set_timesteps(10)
    p.set_timesteps(10)
    x, e = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    t = s.timesteps[0]
    assert not torch.allclose(s.step(e, t, x).prev_sample, p.step(e, t, x).prev_sample)


def test_fgsm_stays_in_ball_and_increases_loss():
    w = torch.randn(2, 3)
    z = torch.zeros(2, 3)
    g = torch.Generator().manual_seed(0)
    adv = fgsm_initial_latent(lambda x: (w * x).sum(), z, epsilon=0.1, steps=10, generator=g)
    assert torch.allclose(adv, 0.1 * w.sign())  # a linear loss is maximised at a corner of the ball
    target = torch.randn(2, 3)
    z2 = torch.randn(2, 3)
    loss = lambda x: (x - target).pow(2).sum()  # noqa: E731
    adv2 = fgsm_initial_latent(loss, z2, epsilon=0.05, steps=3, generator=g)
    assert (adv2 - z2).abs().max() <= 0.05 + 1e-7 and loss(adv2) > loss(z2)


def test_fgsm_moves_away_from_the_clean_output_where_the_gradient_is_zero():
    """The runner's loss ‖f(z) − f(z_T)‖² is minimal at z_T with a zero gradient there; the attack
    must still move (random start) and end with a positive loss, at the same seed reproducibly."""
    torch.manual_seed(0)
    f = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 6))
    z = torch.randn(4, 6)
    clean = f(z).detach()

    def loss(x):
        return (f(x) - clean).pow(2).mean()

    zg = z.clone().requires_grad_(True)
    (g0,) = torch.autograd.grad(loss(zg), zg)
    assert torch.count_nonzero(g0) == 0  # the situation of the bug
    no_start = fgsm_initial_latent(loss, z, epsilon=0.1, steps=5, random_start=False)
    assert torch.equal(no_start, z)  # without a random start nothing happens
    adv = fgsm_initial_latent(loss, z, epsilon=0.1, steps=5, generator=torch.Generator().manual_seed(1))
    again = fgsm_initial_latent(loss, z, epsilon=0.1, steps=5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(adv, again)
    assert (adv - z).abs().max() <= 0.1 + 1e-6 and float(loss(adv)) > 0
    # the gradient steps add to what the random start alone gives
    start_only = fgsm_initial_latent(loss, z, epsilon=0.1, steps=1, step_size=0.0,
                                     generator=torch.Generator().manual_seed(1))
    assert float(loss(adv)) > float(loss(start_only))


def test_resize_and_protocol_record():
    assert resize_images(torch.rand(2, 1, 56, 56), 28).shape == (2, 1, 28, 28)
    flat = torch.full((1, 1, 56, 56), 0.3)
    assert torch.allclose(resize_images(flat, 28), torch.full((1, 1, 28, 28), 0.3))
    assert RobustnessProtocol("resolution", {"size": 56}).as_params()["robustness"]["kind"] == "resolution"
    with pytest.raises(ValueError, match="unknown robustness"):
        RobustnessProtocol("blur")


def test_perturbed_ddim_stays_finite_when_the_noise_levels_lose_their_order():
    from diffusers import DDIMScheduler

    base = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                         set_alpha_to_one=False)
    p = perturb_scheduler(base, std=0.05, seed=0)  # the protocol's ε: ᾱ is already non-monotone
    assert (p.alphas_cumprod[1:] > p.alphas_cumprod[:-1]).any()
    assert torch.equal(p.final_alpha_cumprod, p.alphas_cumprod[0])
    p.set_timesteps(50)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for t in p.timesteps:
        x = p.step(torch.zeros_like(x), t, x, eta=0.0).prev_sample
    assert torch.isfinite(x).all()
