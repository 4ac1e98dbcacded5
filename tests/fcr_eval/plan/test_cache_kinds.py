"""The cache-kind registry: every sampler kind of the vocabulary with a module resolves to its
:class:`~fcr_eval.plan.caches.CacheKind`, and a new kind is one module plus one row — the plan's
sampler, forward counts, stored schedule and the runner's attach / detach then follow it with no
other change (shown with a toy kind)."""

from __future__ import annotations

import sys
import types

import pytest
from fcr_eval.plan.caches import CacheKind, cache_kind
from fcr_eval.plan.samplers import apply_sampler, remove_sampler, resolve_sampler
from fcr_eval.spec import vocabulary
from fcr_eval.spec.vocabulary import CACHED_SAMPLERS, SAMPLER_KINDS, SAMPLERS, SamplerKind


def test_every_cached_kind_has_its_module_and_the_words_follow_the_rows():
    assert SAMPLERS == tuple(SAMPLER_KINDS)
    assert set(CACHED_SAMPLERS) == {n for n, k in SAMPLER_KINDS.items() if k.module}
    assert cache_kind("none") is None
    for name in CACHED_SAMPLERS:
        assert isinstance(cache_kind(name), CacheKind)
    with pytest.raises(ValueError, match="unknown sampler 'fdd'"):
        cache_kind("fdd")


class _ToyConfig:
    label = "Toy-3"

    def __init__(self, stride):
        self.stride = stride

    def key_steps_for(self, steps):
        return range(0, steps, self.stride)


def test_a_new_kind_is_one_module_and_one_row(monkeypatch):
    attached = []
    module = types.ModuleType("fcr_eval.plan.caches.toy")
    module.KIND = CacheKind(
        build=lambda v, steps: _ToyConfig(v.stride), apply=lambda unet, c: attached.append(c),
        remove=lambda unet: attached.pop(),
        forward_counts=lambda steps, full: {"unet_calls": steps, "full_forwards": full, "encoder_forwards": steps,
                                            "decoder_forwards": full, "partial_forwards": 0},
        interval=lambda c: c.stride)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(vocabulary.SAMPLER_KINDS, "toy", SamplerKind("toy", "a toy cache", module="toy"))
    s = resolve_sampler("toy", steps=9, stride=3)
    assert s.cached and s.label == "Toy-3" and s.key_steps == (0, 3, 6) and s.interval == 3
    assert s.forward_counts() == {"unet_calls": 9, "full_forwards": 3, "encoder_forwards": 9, "decoder_forwards": 3,
                                  "partial_forwards": 0}
    assert s.describe() == {"cache_label": "Toy-3", "cache_key_steps": [0, 3, 6], "cache_interval": 3}
    assert apply_sampler(object(), s) and attached == [s.cache]
    remove_sampler(object(), s)
    assert attached == []
