"""A run's x_T by batch (:class:`fcr_eval.run.noise.InitialNoise`) equals the rows of the whole
run's tensor exactly, in any batch order and for sizes with and without torch's tail rule."""

from __future__ import annotations

import pytest
import torch
from fcr_eval.run.noise import InitialNoise


def _whole(n, shape, seed):
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("n,shape", [(11, (1, 28, 28)), (7, (3, 5, 5)), (5, (1, 3, 3)), (9, (2,)), (3, (1, 2, 2)),
                                     (40, (4, 8, 8))])
@pytest.mark.parametrize("bs", [1, 3, 4])
def test_batches_equal_the_whole_tensor_bit_for_bit(n, shape, bs):
    whole = _whole(n, shape, seed=5)
    noise = InitialNoise(shape, n, seed=5)
    got = torch.cat([noise.rows(a, min(a + bs, n)) for a in range(0, n, bs)])
    assert torch.equal(got, whole)


def test_any_order_and_jumps_give_the_same_rows():
    n, shape = 23, (3, 5, 5)  # 23 × 75 values: not a multiple of 16, so the tail rule applies
    whole = _whole(n, shape, seed=1)
    noise = InitialNoise(shape, n, seed=1)
    for a, b in [(20, 23), (0, 4), (8, 12), (4, 8), (22, 23), (0, 23), (12, 20)]:
        assert torch.equal(noise.rows(a, b), whole[a:b]), (a, b)


def test_skipping_in_chunks_lands_on_the_same_values(monkeypatch):
    import fcr_eval.run.noise as mod

    monkeypatch.setattr(mod, "_SKIP_CHUNK", 32)  # many small skips
    whole = _whole(30, (1, 7, 7), seed=2)
    assert torch.equal(InitialNoise((1, 7, 7), 30, seed=2).rows(25, 30), whole[25:30])


def test_dtype_and_bounds():
    noise = InitialNoise((2, 4, 4), 6, seed=0, dtype=torch.float16)
    assert torch.equal(noise.rows(2, 5), _whole(6, (2, 4, 4), 0)[2:5].to(torch.float16))
    with pytest.raises(ValueError, match="outside the run's 6 samples"):
        noise.rows(4, 7)


@pytest.mark.parametrize("family", ["embedded", "emoji", "sd-float16"])
def test_every_context_streams_its_own_initial_noise(family):
    """The runner takes a run's x_T by batch from ``ctx.noise_stream``: for each model family it
    must be the rows of that context's own ``initial_noise`` (the x_T every stored number used)."""
    from fcr_eval.run.contexts import EmbeddedContext, EmojiContext, StableDiffusionContext

    if family == "embedded":
        ctx, res = object.__new__(EmbeddedContext), 28
    elif family == "emoji":
        ctx, res = object.__new__(EmojiContext), 32
        ctx.vae_scale, ctx.unet_config = 4, {"in_channels": 3}
    else:
        ctx, res = object.__new__(StableDiffusionContext), 40
        ctx.vae_scale, ctx.latent_channels, ctx.dtype = 8, 4, torch.float16
    whole = ctx.initial_noise(13, res, 7)
    stream = ctx.noise_stream(13, res, 7)
    got = torch.cat([stream.rows(a, min(a + 5, 13)) for a in range(0, 13, 5)])
    assert got.dtype == whole.dtype and torch.equal(got, whole)
