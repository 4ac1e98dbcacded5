"""Robustness protocols of exp-2: noise-schedule perturbation, adversarial latent noise (FGSM on
the initial latent), resolution change; plus the record that says which one a run used.

* :func:`perturb_sigmas` / :func:`perturbed_alphas_cumprod` / :func:`perturb_scheduler` —
  σ_t·(1+ε), ε ~ N(0, std²) with std = 0.05 by default, one ε per timestep, seeded. σ_t is the
  noise-to-signal ratio √((1−ᾱ_t)/ᾱ_t) of the DDPM parametrisation (the k-diffusion σ).
  The sampler then believes in a noise level the model was not trained on.
* :func:`fgsm_initial_latent` — iterative FGSM (L∞ ball of radius ε, ``steps`` signed-gradient
  steps of ε/steps) that *maximises* a user-given loss of the initial latent, e.g. the distance
  of the generated image from the unperturbed one.
* :func:`resize_images` — bring samples made at a higher resolution back to the reference
  resolution before feature extraction (antialiased), so quality is compared like for like.

Example:
    >>> sched = perturb_scheduler(pipe.scheduler, std=0.05, seed=0)
    >>> pipe.scheduler = sched        # sample as usual; store RobustnessProtocol(...).as_params()
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.nn import functional as F

from fcr_eval.spec.vocabulary import ROBUSTNESS_PROTOCOLS

__all__ = [
    "RobustnessProtocol",
    "perturb_sigmas",
    "perturbed_alphas_cumprod",
    "perturb_scheduler",
    "fgsm_initial_latent",
    "resize_images",
]

logger = logging.getLogger(__name__)

PROTOCOLS = ROBUSTNESS_PROTOCOLS


@dataclass(frozen=True)
class RobustnessProtocol:
    """Which stress a run applies, stored in ``runs.params['robustness']``.

    Example:
        >>> RobustnessProtocol("fgsm_latent", {"epsilon": 0.1, "steps": 10}).as_params()
        {'robustness': {'kind': 'fgsm_latent', 'settings': {'epsilon': 0.1, 'steps': 10}}}
    """

    kind: str = "none"
    settings: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in PROTOCOLS:
            raise ValueError(f"unknown robustness protocol {self.kind!r}; use one of {PROTOCOLS}")

    def as_params(self) -> dict[str, Any]:
        return {"robustness": asdict(self)}


def perturb_sigmas(sigmas: torch.Tensor, std: float = 0.05, generator: torch.Generator | None = None) -> torch.Tensor:
    """σ·(1+ε), ε ~ N(0, std²) per entry; zero σ (the final step) stays zero; clamped positive.

    Example:
        >>> perturb_sigmas(torch.tensor([14.6, 1.0, 0.0]), generator=torch.Generator().manual_seed(0))
    """
    eps = torch.randn(sigmas.shape, generator=generator, dtype=torch.float64) * std
    out = sigmas.double() * (1 + eps.to(sigmas.device))
    out = torch.where(sigmas.double() > 0, out.clamp_min(1e-8), torch.zeros_like(out))
    return out.to(sigmas.dtype)


def perturbed_alphas_cumprod(alphas_cumprod: torch.Tensor, std: float = 0.05,
                             generator: torch.Generator | None = None) -> torch.Tensor:
    """ᾱ_t with σ_t = √((1−ᾱ_t)/ᾱ_t) perturbed to σ_t·(1+ε): ᾱ'_t = 1 / (1 + σ'_t²).

    Example:
        >>> a = DDPMScheduler().alphas_cumprod
        >>> perturbed_alphas_cumprod(a, 0.0).allclose(a)
        True
    """
    a = alphas_cumprod.double()
    sigma = ((1 - a) / a).sqrt()
    sigma_p = perturb_sigmas(sigma, std, generator)
    return (1 / (1 + sigma_p**2)).to(alphas_cumprod.dtype)


def perturb_scheduler(scheduler, std: float = 0.05, seed: int = 0):
    """A copy of a diffusers scheduler whose noise schedule is perturbed σ_t·(1+ε).

    Works for schedulers that derive everything from ``alphas_cumprod`` (DDPM, DDIM, PNDM, Euler,
    DPM-Solver++, ...): ``alphas_cumprod`` is replaced and the derived ``alpha_t``, ``sigma_t``,
    ``lambda_t`` and ``sigmas`` are recomputed where the scheduler has them. Call
    ``set_timesteps`` afterwards (pipelines do). The original scheduler is not touched.

    Example:
        >>> pipe.scheduler = perturb_scheduler(pipe.scheduler, std=0.05, seed=3)
    """
    if not hasattr(scheduler, "alphas_cumprod"):
        raise TypeError(
            f"{type(scheduler).__name__} has no alphas_cumprod; perturb its sigmas with perturb_sigmas() instead")
    new = copy.deepcopy(scheduler)
    gen = torch.Generator().manual_seed(seed)
    ac = perturbed_alphas_cumprod(scheduler.alphas_cumprod, std, gen)
    new.alphas_cumprod = ac
    if hasattr(new, "alphas"):
        prev = torch.cat([torch.ones(1, dtype=ac.dtype), ac[:-1]])
        new.alphas = ac / prev
        new.betas = 1 - new.alphas
    if hasattr(new, "alpha_t"):
        new.alpha_t = ac.sqrt()
        new.sigma_t = (1 - ac).sqrt()
        new.lambda_t = new.alpha_t.log() - new.sigma_t.log()
    if hasattr(new, "sigmas") and getattr(scheduler, "sigmas", None) is not None and not hasattr(new, "alpha_t"):
        new.sigmas = ((1 - ac) / ac).sqrt().flip(0)
        if getattr(scheduler, "num_inference_steps", None):
            new.set_timesteps(scheduler.num_inference_steps)
    if hasattr(new, "final_alpha_cumprod") and not getattr(new.config, "set_alpha_to_one", False):
        new.final_alpha_cumprod = ac[0]  # DDIM's ᾱ before step 0 follows the perturbed schedule
    if hasattr(new, "_get_variance"):
        # Independent ε per timestep can make ᾱ_t > ᾱ_prev; DDIM's variance then goes negative and
        # even at η = 0 the step computes 0·√(negative) = NaN. A negative variance means "none".
        variance = new._get_variance
        new._get_variance = lambda *a, _v=variance, **k: _v(*a, **k).clamp_min(0)
    new.fcr_perturbation = {"kind": "schedule_perturbation", "std": std, "seed": seed}
    logger.info("noise schedule of %s perturbed: σ·(1+ε), ε~N(0, %.3g²), seed %d", type(scheduler).__name__, std, seed)
    return new


def fgsm_initial_latent(loss_fn: Callable[[torch.Tensor], torch.Tensor], latents: torch.Tensor, *,
                        epsilon: float = 0.1, steps: int = 10, step_size: float | None = None,
                        random_start: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
    """Adversarial initial latent: iterative FGSM maximising ``loss_fn`` in the L∞ ball of radius ε.

    Starts from a uniform random point of the ball (``random_start``, as PGD does: Madry et al.
    2018, https://arxiv.org/abs/1706.06083), then each step moves ``step_size`` (default
    2.5·ε/steps) along ``sign(∇ loss)`` and projects back into the ball around ``latents``
    (Kurakin et al. 2016, https://arxiv.org/abs/1607.02533; FGSM: Goodfellow et al. 2014,
    https://arxiv.org/abs/1412.6572). The random start matters for the runner's loss, the
    distance of the sampled images to the clean ones: it is minimal at ``latents``, where its
    gradient is exactly zero, so an attack starting there never moves. ``loss_fn`` maps a latent
    batch to a scalar and must be differentiable.

    Example:
        >>> adv = fgsm_initial_latent(lambda z: (sample(z) - clean).pow(2).mean(), z_T, epsilon=0.1, steps=10)
        >>> (adv - z_T).abs().max() <= 0.1
    """
    if epsilon < 0 or steps < 1:
        raise ValueError("epsilon must be >= 0 and steps >= 1")
    alpha = 2.5 * epsilon / steps if step_size is None else step_size
    x0 = latents.detach()
    x = x0.clone()
    if random_start:
        u = torch.rand(x0.shape, generator=generator, dtype=torch.float32).to(x0.device, x0.dtype)
        x = x0 + (2 * u - 1) * epsilon
    for _ in range(steps):
        x.requires_grad_(True)
        with torch.enable_grad():
            loss = loss_fn(x)
            if loss.ndim != 0:
                raise ValueError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)}")
            (grad,) = torch.autograd.grad(loss, x)
        x = x.detach() + alpha * grad.sign()
        x = (x0 + (x - x0).clamp(-epsilon, epsilon)).detach()
    return x


def resize_images(images: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Antialiased bilinear resize of ``(N, C, H, W)`` float images, clamped to [0, 1].

    Example:
        >>> resize_images(torch.rand(2, 1, 56, 56), 28).shape
        torch.Size([2, 1, 28, 28])
    """
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(images.shape[-2:]) == size:
        return images
    return F.interpolate(images.float(), size=size, mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
