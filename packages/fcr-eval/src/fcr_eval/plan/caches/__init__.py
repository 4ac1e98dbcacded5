"""Cache kinds: how each sampler kind of an experiment file is built, attached and counted.

A kind is one module here that defines ``KIND``, a :class:`CacheKind`, plus its row in
:data:`fcr_eval.spec.vocabulary.SAMPLER_KINDS` (the name a variation's ``sampler`` uses, what it
is, and this module's name). Nothing else branches on the kind: the plan builds the kind's
fcr-sample config once (:func:`fcr_eval.plan.samplers.sampler_for`), and the forward counts, the
effective schedule stored with a run, and the hook the runner attaches and removes are all read
off that config through the kind.

Adding a kind (e.g. an adaptive cache)::

    # fcr_eval/plan/caches/adaptive.py
    KIND = CacheKind(build=lambda v, steps: AdaptiveCacheConfig(...), apply=apply_adaptive_cache,
                     remove=remove_adaptive_cache, forward_counts=..., interval=lambda config: None)

    # fcr_eval/spec/vocabulary.py, SAMPLER_KINDS
    SamplerKind("adaptive", "an adaptive cache: ...", module="adaptive", interval=False),

A setting the kind needs that variations do not have yet is a new ``VariationSpec`` field, with its
check in :mod:`fcr_eval.spec.variations` and its identity decision in :mod:`fcr_eval.plan.identity`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fcr_eval.spec.vocabulary import SAMPLER_KINDS

__all__ = ["CacheKind", "cache_kind"]


@dataclass(frozen=True)
class CacheKind:
    """What the plan and the runner need of one cache kind.

    Attributes:
        build: ``(variation, steps) -> config``: the fcr-sample config of a variation's cache at
            ``steps`` sampler steps (the config's own checks refuse bad settings).
        apply: ``(unet, config)``: attach the cache's hooks to a UNet.
        remove: ``(unet)``: detach them exactly.
        forward_counts: ``(steps, full_steps) -> counts``: per sampling run, UNet calls and full /
            encoder / decoder / partial forwards, given how many steps run the whole UNet.
        interval: ``config -> int | None``: the uniform stride or interval actually used; ``None``
            when the schedule is not uniform.
    """

    build: Callable[[Any, int], Any]
    apply: Callable[[Any, Any], None]
    remove: Callable[[Any], None]
    forward_counts: Callable[[int, int], dict[str, int]]
    interval: Callable[[Any], int | None]


def cache_kind(name: str) -> CacheKind | None:
    """The :class:`CacheKind` of sampler kind ``name`` (``None`` for ``"none"``).

    Raises:
        ValueError: ``name`` is not a sampler kind.
    """
    row = SAMPLER_KINDS.get(name)
    if row is None:
        raise ValueError(f"unknown sampler {name!r}; allowed are {tuple(SAMPLER_KINDS)}")
    if row.module is None:
        return None
    return importlib.import_module(f"{__name__}.{row.module}").KIND
