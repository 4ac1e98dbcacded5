"""The Δ-sampling record every consistency objective shares: how far apart its two timesteps are.

A consistency objective compares the UNet at two timesteps Δ apart, Δ ~ U(1, Δ_max), counted in
``delta_unit``: DDPM training timesteps (the paper's formula), or steps of the sampler the
fine-tune serves (one unit = ``T // sampler_steps`` timesteps, :func:`sampler_step_timesteps`).
:class:`DeltaSampling` holds these settings and their checks once; FCR
(:class:`fcr_train.loss.FCRConfig`) and output consistency
(:class:`fcr_train.output_consistency.OutputConsistencyConfig`) extend it with their own terms
and defaults. Torch-free.

Example:
    >>> DeltaSampling(delta_max=10, delta_unit="sampler_steps", sampler_steps=20).timesteps_per_delta(1000)
    50
"""

from __future__ import annotations

from dataclasses import dataclass

from .vocabulary import DELTA_UNITS

__all__ = ["DeltaSampling", "sampler_step_timesteps"]


def sampler_step_timesteps(num_train_timesteps: int, num_inference_steps: int) -> int:
    """Training timesteps between two consecutive sampler steps: ``T // steps``.

    This is the step ratio of diffusers' DDIM / DPM-Solver++ with their default ``"leading"``
    timestep spacing (timesteps ``k · T // steps``), so Δ = k sampler steps is exactly the offset
    between sampler steps i and i + k.

    Example:
        >>> sampler_step_timesteps(1000, 20)
        50
    """
    T, n = int(num_train_timesteps), int(num_inference_steps)
    if n < 1 or n > T:
        raise ValueError(f"num_inference_steps = {n} must be in [1, num_train_timesteps = {T}]")
    return T // n


@dataclass(frozen=True)
class DeltaSampling:
    """How Δ between an objective's two timesteps is drawn (checked in ``__post_init__``).

    Attributes:
        delta_max: Δ ~ U(1, delta_max), in ``delta_unit``. ``None`` means "the stride it serves":
            Δ_max = ``stride`` (which must then be set).
        delta_unit: ``"timesteps"`` (DDPM timesteps) or ``"sampler_steps"`` (one unit =
            ``T // sampler_steps`` timesteps).
        sampler_steps: the sampler's step count (the experiment's ``num_inference_steps``);
            required with ``delta_unit = "sampler_steps"``.
        stride: the cache stride / interval the fine-tune serves (recorded; Δ_max's default).
    """

    delta_max: int | None = 10
    delta_unit: str = "timesteps"
    sampler_steps: int | None = None
    stride: int | None = None

    def __post_init__(self) -> None:
        name = type(self).__name__
        if self.delta_unit not in DELTA_UNITS:
            raise ValueError(f"{name}.delta_unit must be one of {DELTA_UNITS}, got {self.delta_unit!r}")
        if self.stride is not None and int(self.stride) < 1:
            raise ValueError(f"{name}.stride must be >= 1, got {self.stride}")
        if self.delta_max is None:
            if self.stride is None:
                raise ValueError(f"{name}.delta_max = None means 'the stride it serves'; set stride too "
                                 "(e.g. stride=10 for FD-10), or give delta_max")
            object.__setattr__(self, "delta_max", int(self.stride))
        if self.delta_unit == "sampler_steps" and (self.sampler_steps is None or int(self.sampler_steps) < 1):
            raise ValueError(f"{name}.delta_unit = 'sampler_steps' needs sampler_steps = the sampler's step "
                             f"count (the experiment's num_inference_steps), got {self.sampler_steps}")
        if int(self.delta_max) < 1:
            raise ValueError(f"{name}.delta_max must be >= 1, got {self.delta_max}")

    def timesteps_per_delta(self, num_train_timesteps: int) -> int:
        """Training timesteps per unit of Δ for a scheduler with ``num_train_timesteps``
        (``T // sampler_steps`` in sampler steps, else 1)."""
        if self.delta_unit == "sampler_steps":
            return sampler_step_timesteps(num_train_timesteps, self.sampler_steps)
        return 1
