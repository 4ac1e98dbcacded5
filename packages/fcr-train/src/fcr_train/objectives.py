"""Fine-tuning objectives: the term a fine-tune trains besides denoising, one registry row each.

An objective is one module (its config; its loss; how it draws its timesteps; what it checks
before a run) plus one row in :data:`OBJECTIVES`. The trainer knows no objective by name: it
looks the row up from the config it is given (:func:`objective_for`) and calls the row.

* ``fcr`` — :mod:`fcr_train.loss`: ``λ · ‖Enc(x_t) − Enc(x_{t−Δ})‖`` (λ = 0: plain fine-tuning);
* ``output_consistency`` — :mod:`fcr_train.output_consistency`: the UNet's output with a cache's
  stale features against the fresh output;
* ``rollout`` — :mod:`fcr_train.rollout`: k stale steps of a cached sampler against the same
  steps fresh.

The two Δ-based objectives share one Δ-sampling record (:class:`fcr_train.delta.DeltaSampling`).

Adding one::

    # fcr_train/<name>.py: its config, loss, draw and check
    # here, in OBJECTIVES:
    Objective("name", NameConfig, check=..., module=..., draw=..., term="name"),

and ``TrainConfig(fcr=FCRConfig(lam=0), objective=NameConfig(...))`` trains it; ``config.json``
records it under its name.

Example:
    >>> objective_for(FCRConfig(lam=0.1)).name
    'fcr'
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from fcr_sample.features import select_feature_names
from fcr_sample.vocabulary import BLOCK_GROUPS

from .loss import FCRConfig, fcr_loss, sample_timesteps
from .output_consistency import (
    OutputConsistencyConfig,
    check_output_consistency,
    output_consistency_loss,
    sample_oc_timesteps,
)
from .rollout import (
    RolloutConfig,
    check_rollout,
    rollout_loss,
    sample_key_steps,
    sampling_scheduler,
)

__all__ = ["Objective", "OBJECTIVES", "objective_for", "ObjectiveModule", "RolloutModule"]


@dataclass(frozen=True)
class Objective:
    """One fine-tuning objective as the trainer uses it.

    Attributes:
        name: its name (``config.json`` records its config under it).
        config: its config class.
        check: ``(unet, scheduler, config, conditioner, *, grad_checkpointing)``: what the config
            needs of the UNet, the scheduler and the conditioner, before the run folder exists.
        module: ``(unet, scheduler, config, conditioner) -> torch.nn.Module`` whose
            ``forward(x0, text, noise, t, extra)`` returns the loss output (``.loss``, ``.denoise``
            and the term's value as attribute ``term``); one module, so that DDP wraps it whole.
        draw: ``(module, n, num_train_timesteps, *, generator, device, draw_noise) -> (t, extra,
            noise)``: a micro-batch's random draws, in an order that keeps exact resume (``draw_noise()``
            draws ε).
        term: the name its loss is logged under (``l_<term>``, ``l_<term>_weighted``,
            ``<term>_to_denoise``).
    """

    name: str
    config: type
    check: Callable[..., None]
    module: Callable[..., torch.nn.Module]
    draw: Callable[..., tuple[torch.Tensor, Any, torch.Tensor]]
    term: str

    def term_value(self, out) -> torch.Tensor:
        """The objective's term (unweighted) in a loss output."""
        return getattr(out, self.term)


class ObjectiveModule(torch.nn.Module):
    """The UNet plus a loss ``loss(unet, scheduler, x0, text, config, *, noise, timesteps, deltas)``."""

    def __init__(self, unet: torch.nn.Module, scheduler, config, loss: Callable[..., Any]):
        super().__init__()
        self.unet = unet
        self.scheduler = scheduler
        self.config = config
        self.loss = loss

    def forward(self, x0, encoder_hidden_states, noise, timesteps, deltas):
        return self.loss(self.unet, self.scheduler, x0, encoder_hidden_states, self.config,
                         noise=noise, timesteps=timesteps, deltas=deltas)


class RolloutModule(torch.nn.Module):
    """The UNet plus the rollout loss (``config``: a :class:`~fcr_train.rollout.RolloutConfig`).
    The DDIM sampler of the rollouts is built once, on ``scheduler``'s schedule; ``null_states``
    are the unconditional text states (guided rollouts)."""

    def __init__(self, unet: torch.nn.Module, scheduler, config: RolloutConfig, null_states: torch.Tensor | None = None):
        super().__init__()
        self.unet = unet
        self.scheduler = scheduler
        self.config = config
        self.sampler = sampling_scheduler(scheduler, config)
        self.null_states = null_states

    def forward(self, x0, encoder_hidden_states, noise, timesteps, key_steps):
        null = None if self.null_states is None else self.null_states.to(x0.device, encoder_hidden_states.dtype)
        return rollout_loss(self.unet, self.scheduler, x0, encoder_hidden_states, self.config, null_states=null,
                            noise=noise, timesteps=timesteps, key_steps=key_steps, sampler=self.sampler)


# -- FCR -------------------------------------------------------------------------------------------


def _check_fcr(unet, scheduler, config: FCRConfig, conditioner, *, grad_checkpointing: bool = False) -> None:
    """Resolve ``config.blocks`` on ``unet`` now, so a name that is not a feature of this UNet stops
    the run before its folder exists (the loss resolves it only at the first step, and only with
    lam > 0: with lam = 0 the blocks are not used)."""
    if config.lam <= 0:
        return
    try:
        select_feature_names(unet, config.blocks)
    except ValueError as exc:
        shown = config.blocks if isinstance(config.blocks, str) else ",".join(config.blocks)
        raise ValueError(f"FCRConfig.blocks = {shown!r}: {exc}. Pass one of {', '.join(BLOCK_GROUPS)} or "
                         "comma-separated feature-name prefixes of this UNet") from None


def _control_draw(config: FCRConfig | None, n: int, T: int, generator, device):
    """FCR's (t, Δ): t ~ U(Δ, T−1) paired with the less noisy t − Δ; the λ = 0 control's t ~ U(0, T−1)."""
    fcr = config if config is not None else FCRConfig(lam=0.0)
    return sample_timesteps(n, T, fcr.delta_max, generator=generator, device=device, fcr=fcr.lam > 0,
                            delta_scale=fcr.timesteps_per_delta(T))


def _draw_fcr(module, n, T, *, generator, device, draw_noise):
    t, delta = _control_draw(module.config, n, T, generator, device)
    return t, delta, draw_noise()


# -- output consistency ----------------------------------------------------------------------------


def _check_oc(unet, scheduler, config: OutputConsistencyConfig, conditioner, *, grad_checkpointing: bool = False):
    check_output_consistency(unet, scheduler.config.num_train_timesteps, config, grad_checkpointing=grad_checkpointing)


def _draw_oc(module, n, T, *, generator, device, draw_noise):
    t, delta = sample_oc_timesteps(n, T, module.config, generator=generator, device=device)
    return t, delta, draw_noise()


# -- rollout ---------------------------------------------------------------------------------------


def _check_rollout(unet, scheduler, config: RolloutConfig, conditioner, *, grad_checkpointing: bool = False):
    check_rollout(unet, scheduler, config, grad_checkpointing=grad_checkpointing)
    if config.guidance_scale != 1.0 and getattr(conditioner, "null_states", None) is None:
        raise ValueError(f"a guided rollout (guidance_scale = {config.guidance_scale}) needs the conditioner's "
                         "unconditional states (null_states); this conditioner has none: set guidance_scale = 1")


def _rollout_module(unet, scheduler, config: RolloutConfig, conditioner) -> RolloutModule:
    return RolloutModule(unet, scheduler, config, conditioner.null_states if config.guidance_scale != 1.0 else None)


def _draw_rollout(module, n, T, *, generator, device, draw_noise):
    # The control's t and ε first, so L_denoise sees the λ = 0 control's draws; the key steps after.
    t, _ = _control_draw(None, n, T, generator, device)
    noise = draw_noise()
    return t, sample_key_steps(module.config.rows(n), module.sampler.timesteps, T, module.config,
                               generator=generator), noise


#: The objectives, one row each.
OBJECTIVES: dict[str, Objective] = {o.name: o for o in (
    Objective("fcr", FCRConfig, _check_fcr, lambda u, s, c, cond: ObjectiveModule(u, s, c, fcr_loss), _draw_fcr,
              term="fcr"),
    Objective("output_consistency", OutputConsistencyConfig, _check_oc,
              lambda u, s, c, cond: ObjectiveModule(u, s, c, output_consistency_loss), _draw_oc, term="oc"),
    Objective("rollout", RolloutConfig, _check_rollout, _rollout_module, _draw_rollout, term="rollout"),
)}


def objective_for(config) -> Objective:
    """The registered objective whose config ``config`` is.

    Raises:
        TypeError: no objective takes this config.
    """
    for objective in OBJECTIVES.values():
        if type(config) is objective.config:
            return objective
    raise TypeError(f"no fine-tuning objective takes a {type(config).__name__}; registered: "
                    f"{', '.join(f'{o.name} ({o.config.__name__})' for o in OBJECTIVES.values())}")
