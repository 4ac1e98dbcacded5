"""The samplers an experiment compares, resolved once into fcr-sample's own config objects.

A variation names a sampler kind (:data:`SAMPLERS`) and its settings; the planner turns them into
a :class:`SamplerSettings` holding the built :class:`~fcr_sample.EncoderCacheConfig` or
:class:`~fcr_sample.DeepCacheConfig` and the step count it runs at. Everything downstream — the
forward counts of the plan, the hook the runner attaches, the effective schedule stored with the
run — is read off that one object, never re-derived from the variation.

Example:
    >>> s = resolve_sampler("fd", steps=20, stride=10)
    >>> s.label, s.key_steps, s.interval
    ('FD-10', (0, 10), 10)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fcr_eval.spec.vocabulary import SAMPLERS

__all__ = ["SamplerSettings", "resolve_sampler", "apply_sampler",
           "remove_sampler"]



@dataclass(frozen=True)
class SamplerSettings:
    """A variation's sampler, resolved for one step count.

    Attributes:
        kind: one of :data:`SAMPLERS`.
        cache: the fcr-sample config the hook is built from (``None`` for ``"none"``).
        num_steps: sampler steps (UNet calls per sampling run).
    """

    kind: str
    cache: Any
    num_steps: int

    @property
    def cached(self) -> bool:
        return self.cache is not None

    @property
    def label(self) -> str:
        """The effective schedule's name: ``FD-10``, ``FD-published``, ``DeepCache-N5-b0``, ``none``."""
        return self.cache.label if self.cache is not None else "none"

    @property
    def key_steps(self) -> tuple[int, ...]:
        """Step indices that run the full encoder (FD) or the full UNet (DeepCache)."""
        if self.cache is None:
            return tuple(range(self.num_steps))
        return tuple(int(s) for s in self.cache.key_steps_for(self.num_steps))

    @property
    def interval(self) -> int | None:
        """The uniform stride (FD) or cache interval (DeepCache) actually used; ``None`` when the
        schedule is not uniform (published or explicit key steps) or there is no cache."""
        if self.kind == "fd":
            c = self.cache
            return int(c.stride) if c.key_steps is None and c.schedule == "uniform" else None
        if self.kind == "deepcache":
            uniform = getattr(self.cache, "skip_mode", "uniform") == "uniform"
            return int(self.cache.cache_interval) if uniform else None
        return None

    def forward_counts(self) -> dict[str, int]:
        """Per sampling run: UNet calls and full / encoder / decoder / partial forwards."""
        n, full = self.num_steps, len(self.key_steps)
        if self.kind == "fd":
            return {"unet_calls": n, "full_forwards": full, "encoder_forwards": full, "decoder_forwards": n,
                    "partial_forwards": 0}
        if self.kind == "deepcache":
            return {"unet_calls": n, "full_forwards": full, "encoder_forwards": full, "decoder_forwards": full,
                    "partial_forwards": n - full}
        return {"unet_calls": n, "full_forwards": n, "encoder_forwards": n, "decoder_forwards": n,
                "partial_forwards": 0}

    def describe(self) -> dict[str, Any]:
        """The effective schedule as stored with a run."""
        return {"cache_label": self.label, "cache_key_steps": list(self.key_steps) if self.cached else None,
                "cache_interval": self.interval}


def resolve_sampler(kind: str, *, steps: int, stride: int | None = None, schedule: str = "uniform",
                    parallel_decoding: bool = True, prior_noise_alpha: float = 0.0,
                    cache_branch_id: int = 0) -> SamplerSettings:
    """Build the sampler of a variation: the fcr-sample config and the step count it runs at.

    Raises:
        ValueError: an unknown kind, or settings the config refuses (its message says which).
    """
    from fcr_sample import DeepCacheConfig, EncoderCacheConfig

    if kind not in SAMPLERS:
        raise ValueError(f"unknown sampler {kind!r}; allowed are {SAMPLERS}")
    if kind == "fd":
        cache = EncoderCacheConfig(stride=stride, schedule=schedule, parallel_decoding=parallel_decoding,
                                   prior_noise_alpha=prior_noise_alpha)
    elif kind == "deepcache":
        cache = DeepCacheConfig(cache_interval=stride, cache_branch_id=cache_branch_id)
    else:
        cache = None
    return SamplerSettings(kind, cache, int(steps))


def apply_sampler(unet, sampler: SamplerSettings) -> bool:
    """Attach the sampler's cache hook to ``unet``; returns whether one was attached."""
    from fcr_sample import apply_deep_cache, apply_encoder_cache

    if sampler.kind == "fd":
        apply_encoder_cache(unet, sampler.cache)
    elif sampler.kind == "deepcache":
        apply_deep_cache(unet, sampler.cache)
    return sampler.cached


def remove_sampler(unet, sampler: SamplerSettings) -> None:
    """Detach what :func:`apply_sampler` attached (exact removal)."""
    from fcr_sample import remove_deep_cache, remove_encoder_cache

    if sampler.kind == "fd":
        remove_encoder_cache(unet)
    elif sampler.kind == "deepcache":
        remove_deep_cache(unet)
