"""torch.compile on a cached UNet: the blocks compiled, the hook eager.

The compiler backend is ``torch._dynamo.testing.CompileCounter``: it counts every frame Dynamo
compiles and then runs the captured graph as is, so the test checks graph capture and recompiles
(what breaks when a hook's control flow is compiled) in seconds on a CPU; Inductor's code
generation would take minutes here and is not what is being tested.
"""

from __future__ import annotations

import pytest
import torch
from fcr_sample import (
    EncoderCacheConfig,
    apply_encoder_cache,
    compile_unet_regions,
    remove_encoder_cache,
    uncompile_unet_regions,
)
from fcr_sample.compilation import unet_regions
from fcr_sample.testing import sample_latents


@pytest.fixture
def counter():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    yield CompileCounter()
    torch._dynamo.reset()


def test_compiled_blocks_equal_eager_and_a_repeated_call_compiles_nothing(make_pipe, counter):
    pipe = make_pipe("dpm++")
    eager = sample_latents(pipe, steps=10)
    apply_encoder_cache(pipe, EncoderCacheConfig(stride=4))  # decoder batches of 4, 4 and 2 steps
    try:
        eager_cached = sample_latents(pipe, steps=10)
        names = compile_unet_regions(pipe, backend=counter, dynamic=False)
        first = sample_latents(pipe, steps=10)
        frames = counter.frame_count
        second, third = sample_latents(pipe, steps=10), sample_latents(pipe, steps=10)
        assert counter.frame_count == frames  # no new graphs on the second and later calls
        uncompile_unet_regions(pipe)
        sample_latents(pipe, steps=10)
        assert counter.frame_count == frames  # eager again
    finally:
        remove_encoder_cache(pipe)
        uncompile_unet_regions(pipe)
    assert names == [n for n, _ in unet_regions(pipe.unet)]
    assert frames >= len(names)  # every block was compiled
    for out in (first, second, third):
        torch.testing.assert_close(out, eager_cached, rtol=0, atol=1e-6)
    assert (eager_cached - eager).abs().max() > 1e-4  # the cache was really in the loop
