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


@pytest.mark.parametrize("kind, label", [("adaptive-deepcache", "Adaptive-DeepCache-b0-t0.2"),
                                         ("adaptive-fd", "Adaptive-FD-t0.2")])
def test_the_adaptive_kinds_plan_an_upper_bound_and_attach_the_adaptive_cache(kind, label):
    import torch
    from fcr_sample import denoise
    from fcr_sample.hooks import find_cache_hooks
    from fcr_sample.testing import tiny_scheduler, tiny_unet

    s = resolve_sampler(kind, steps=6, threshold=0.2)
    assert s.label == label and s.interval is None and s.key_steps == tuple(range(6))
    counts = s.forward_counts()  # which steps refresh is decided at run time: every step may
    assert counts["unet_calls"] == counts["full_forwards"] == 6 and counts.get("partial_forwards", 0) == 0
    unet = tiny_unet()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    text = torch.randn(2, 4, unet.config.cross_attention_dim, generator=g)
    ref = denoise(unet, tiny_scheduler(), x, text, steps=6)
    exact = resolve_sampler(kind, steps=6, threshold=0.0)
    assert apply_sampler(unet, exact)
    try:
        assert torch.equal(denoise(unet, tiny_scheduler(), x, text, steps=6), ref)
    finally:
        remove_sampler(unet, exact)
    assert not find_cache_hooks(unet)
