import pytest
import torch
from fcr_sample import (
    DeepCacheConfig,
    apply_deep_cache,
    get_cache_stats,
    key_steps,
    remove_deep_cache,
)
from fcr_sample.testing import sample_latents as sample


@pytest.mark.parametrize("branch", [0, 1])
def test_interval_1_is_the_plain_unet(make_pipe, branch):
    pipe = make_pipe()
    ref = sample(pipe)
    apply_deep_cache(pipe, DeepCacheConfig(cache_interval=1, cache_branch_id=branch))
    out = sample(pipe)
    remove_deep_cache(pipe)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("interval, branch", [(3, 0), (5, 1)])
def test_counters_and_remove(make_pipe, interval, branch):
    pipe = make_pipe("dpm++")
    ref = sample(pipe, steps=12)
    apply_deep_cache(pipe, DeepCacheConfig(cache_interval=interval, cache_branch_id=branch))
    out = sample(pipe, steps=12)
    stats = get_cache_stats(pipe)
    remove_deep_cache(pipe)
    full = len(key_steps(12, stride=interval))
    assert stats.full_forwards == full and stats.partial_forwards == 12 - full
    assert (out - ref).abs().max() > 1e-4
    assert torch.equal(sample(pipe, steps=12), ref)


def test_deeper_branch_stays_closer_to_the_full_model(make_pipe):
    pipe = make_pipe()
    ref = sample(pipe, steps=12)
    errs = []
    for branch in (0, 1):
        apply_deep_cache(pipe, DeepCacheConfig(cache_interval=4, cache_branch_id=branch))
        errs.append((sample(pipe, steps=12) - ref).abs().mean().item())
        remove_deep_cache(pipe)
    assert errs[1] < errs[0]


def test_bad_branch_and_interval_are_refused(make_pipe):
    with pytest.raises(ValueError, match="cache_interval must be an integer >= 1"):
        DeepCacheConfig(cache_interval=0)
    with pytest.raises(ValueError, match="cache_branch_id must be < 3"):
        apply_deep_cache(make_pipe(), DeepCacheConfig(cache_branch_id=3))
