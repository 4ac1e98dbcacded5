"""The samplers an experiment compares, resolved once into fcr-sample's own config objects.

A variation names a sampler kind (:data:`~fcr_eval.spec.vocabulary.SAMPLER_KINDS`) and its
settings; the planner turns them into a :class:`SamplerSettings` holding the built config (an
:class:`~fcr_sample.EncoderCacheConfig`, a :class:`~fcr_sample.DeepCacheConfig`, …) and the step
count it runs at. Everything downstream — the forward counts of the plan, the hook the runner
attaches, the effective schedule stored with the run — is read off that one object through its
kind (:mod:`fcr_eval.plan.caches`), never re-derived from the variation.

Example:
    >>> s = resolve_sampler("fd", steps=20, stride=10)
    >>> s.label, s.key_steps, s.interval
    ('FD-10', (0, 10), 10)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fcr_eval.plan.caches import CacheKind, cache_kind
from fcr_eval.spec.experiment import VariationSpec

__all__ = ["SamplerSettings", "sampler_for", "resolve_sampler", "apply_sampler", "remove_sampler"]


@dataclass(frozen=True)
class SamplerSettings:
    """A variation's sampler, resolved for one step count.

    Attributes:
        kind: a sampler kind of :data:`~fcr_eval.spec.vocabulary.SAMPLER_KINDS`.
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
    def _kind(self) -> CacheKind | None:
        return cache_kind(self.kind)

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
        return self._kind.interval(self.cache) if self.cached else None

    def forward_counts(self) -> dict[str, int]:
        """Per sampling run: UNet calls and full / encoder / decoder / partial forwards."""
        n = self.num_steps
        if not self.cached:
            return {"unet_calls": n, "full_forwards": n, "encoder_forwards": n, "decoder_forwards": n,
                    "partial_forwards": 0}
        return self._kind.forward_counts(n, len(self.key_steps))

    def describe(self) -> dict[str, Any]:
        """The effective schedule as stored with a run."""
        return {"cache_label": self.label, "cache_key_steps": list(self.key_steps) if self.cached else None,
                "cache_interval": self.interval}


def sampler_for(v: VariationSpec, steps: int) -> SamplerSettings:
    """Build variation ``v``'s sampler at ``steps`` sampler steps: its kind's fcr-sample config.

    Raises:
        ValueError: an unknown kind, or settings the config refuses (its message says which).
    """
    kind = cache_kind(v.sampler)
    return SamplerSettings(v.sampler, kind.build(v, int(steps)) if kind is not None else None, int(steps))


def resolve_sampler(kind: str, *, steps: int, **settings: Any) -> SamplerSettings:
    """:func:`sampler_for` from a kind and the variation fields it reads (``stride``, ``schedule``,
    ``parallel_decoding``, ``prior_noise_alpha``, ``cache_branch_id``, …; the others at
    :class:`~fcr_eval.spec.experiment.VariationSpec`'s defaults).

    Raises:
        ValueError: an unknown kind, or settings the config refuses (its message says which).
    """
    return sampler_for(VariationSpec(id="sampler", model="model", sampler=kind, **settings), steps)


def apply_sampler(unet, sampler: SamplerSettings) -> bool:
    """Attach the sampler's cache hook to ``unet``; returns whether one was attached."""
    if sampler.cached:
        cache_kind(sampler.kind).apply(unet, sampler.cache)
    return sampler.cached


def remove_sampler(unet, sampler: SamplerSettings) -> None:
    """Detach what :func:`apply_sampler` attached (exact removal)."""
    if sampler.cached:
        cache_kind(sampler.kind).remove(unet)
