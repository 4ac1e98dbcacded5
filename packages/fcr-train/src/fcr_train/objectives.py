"""Fine-tuning objectives: the term a fine-tune trains besides denoising, one registry row each.

An objective is one module (its config, a :class:`~fcr_train.delta.DeltaSampling`; its loss;
how it draws ``(t, Δ)``; what it checks before a run) plus one row in :data:`OBJECTIVES`. The
trainer knows no objective by name: it looks the row up from the config it is given
(:func:`objective_for`) and calls the row's functions.

* ``fcr`` — :mod:`fcr_train.loss`: ``λ · ‖Enc(x_t) − Enc(x_{t−Δ})‖`` (λ = 0: plain fine-tuning);
* ``output_consistency`` — :mod:`fcr_train.output_consistency`: the UNet's output with a cache's
  stale features against the fresh output.

Adding one (e.g. a rollout objective)::

    # fcr_train/rollout.py: RolloutConfig(DeltaSampling), rollout_loss(unet, scheduler, x0, text, config,
    #                       *, noise, timesteps, deltas), sample_rollout_timesteps(...), check_rollout(...)
    # here, in OBJECTIVES:
    Objective("rollout", RolloutConfig, rollout_loss, sample_rollout_timesteps, check_rollout, term="ro"),

and ``TrainConfig(objective=RolloutConfig(...))`` trains it.

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

from .delta import DeltaSampling
from .loss import FCRConfig, fcr_loss, sample_timesteps
from .output_consistency import (
    OutputConsistencyConfig,
    check_output_consistency,
    output_consistency_loss,
    sample_oc_timesteps,
)

__all__ = ["Objective", "OBJECTIVES", "objective_for", "ObjectiveModule"]


@dataclass(frozen=True)
class Objective:
    """One fine-tuning objective as the trainer uses it.

    Attributes:
        name: its name (recorded with the run).
        config: its config class (a :class:`~fcr_train.delta.DeltaSampling`).
        loss: ``(unet, scheduler, x0, text, config, *, noise, timesteps, deltas) -> output`` with
            ``.loss``, ``.denoise`` and the term's value as attribute ``term``.
        sample_timesteps: ``(n, num_train_timesteps, config, *, generator, device) -> (t, Δ)``.
        check: ``(unet, num_train_timesteps, config, *, grad_checkpointing)``: what the config needs
            of the UNet and the scheduler, before the run folder exists.
        term: the name its loss is logged under (``l_<term>``, ``l_<term>_weighted``,
            ``<term>_to_denoise``).
    """

    name: str
    config: type
    loss: Callable[..., Any]
    sample_timesteps: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    check: Callable[..., None]
    term: str

    def term_value(self, out) -> torch.Tensor:
        """The objective's term (unweighted) in a loss output."""
        return getattr(out, self.term)


def _sample_fcr_timesteps(n: int, num_train_timesteps: int, config: FCRConfig, *, generator=None, device="cpu"):
    """FCR's draw: t ~ U(Δ, T−1) paired with the less noisy t − Δ (plain denoising at λ = 0)."""
    return sample_timesteps(n, num_train_timesteps, config.delta_max, generator=generator, device=device,
                            fcr=config.lam > 0, delta_scale=config.timesteps_per_delta(num_train_timesteps))


def _check_fcr(unet: torch.nn.Module, num_train_timesteps: int, config: FCRConfig, *,
               grad_checkpointing: bool = False) -> None:
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


#: The objectives, one row each.
OBJECTIVES: dict[str, Objective] = {o.name: o for o in (
    Objective("fcr", FCRConfig, fcr_loss, _sample_fcr_timesteps, _check_fcr, term="fcr"),
    Objective("output_consistency", OutputConsistencyConfig, output_consistency_loss, sample_oc_timesteps,
              check_output_consistency, term="oc"),
)}


def objective_for(config: DeltaSampling) -> Objective:
    """The registered objective whose config ``config`` is.

    Raises:
        TypeError: no objective takes this config.
    """
    for objective in OBJECTIVES.values():
        if type(config) is objective.config:
            return objective
    raise TypeError(f"no fine-tuning objective takes a {type(config).__name__}; registered: "
                    f"{', '.join(f'{o.name} ({o.config.__name__})' for o in OBJECTIVES.values())}")


class ObjectiveModule(torch.nn.Module):
    """The UNet plus an objective's loss, as one module so that DDP wraps the whole forward."""

    def __init__(self, unet: torch.nn.Module, scheduler, config: DeltaSampling, objective: Objective):
        super().__init__()
        self.unet = unet
        self.scheduler = scheduler
        self.config = config
        self.objective = objective

    def forward(self, x0, encoder_hidden_states, noise, timesteps, deltas):
        return self.objective.loss(self.unet, self.scheduler, x0, encoder_hidden_states, self.config,
                                   noise=noise, timesteps=timesteps, deltas=deltas)
