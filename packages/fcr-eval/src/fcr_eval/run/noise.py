"""A run's initial noise x_T, one batch at a time, exactly as the whole run's tensor would hold it.

Every context draws a run's x_T as one ``torch.randn((n, *shape), generator=Generator().manual_seed(seed))``
on the CPU (:meth:`fcr_eval.run.contexts.RunContext.initial_noise`); stored numbers rest on those
values. Holding that tensor is ``n × shape`` floats (exp-1: 30,000 × 4 × 64 × 64 × 4 B = 1.9 GB per
run), so :class:`InitialNoise` computes rows ``[a, b)`` of it without it.

How torch fills a CPU float tensor of ``N ≥ 16`` normals (``normal_fill`` in ATen): it draws N
uniforms from the generator in order, turns each aligned block of 16 into 16 normals (Box–Muller
over its two halves), and when ``N % 16 != 0`` redraws the last 16 values from 16 *further*
uniforms. So element ``j < N - 16`` depends only on the uniforms of its aligned block, and drawing
``torch.randn(m)`` (``m % 16 == 0``) from a generator that has consumed ``p`` uniforms (``p % 16 == 0``)
gives exactly elements ``[p, p + m)``. Each float32 normal consumes one uniform whichever kernel
(scalar or vectorised) draws it, so skipping ``p`` values is drawing ``p`` and dropping them, in
bounded chunks. The stream moves forward batch by batch; only a jump (a resumed run, another
process's first batch) redraws from the seed. ``tests/fcr_eval/run/test_noise.py`` checks the rows
against the whole tensor for shapes with and without the tail rule.

Example:
    >>> noise = InitialNoise(ctx.initial_noise(1, 28, seed)[0].shape, n=1000, seed=seed)
    >>> noise.rows(200, 300).shape          # == ctx.initial_noise(1000, 28, seed)[200:300]
    torch.Size([100, 1, 28, 28])
"""

from __future__ import annotations

import math

import torch

__all__ = ["InitialNoise"]

_BLOCK = 16
_SKIP_CHUNK = 1 << 22  # values drawn and dropped at a time when the stream jumps ahead (16 MiB)


class InitialNoise:
    """Rows of ``torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))``, by batch.

    Args:
        shape: one sample's shape (e.g. ``(1, 28, 28)`` or ``(4, 64, 64)``).
        n: the run's sample count (the tail rule depends on the whole tensor's size).
        seed: the run's x_T seed.
        dtype: the dtype the context converts x_T to (elementwise, after drawing float32).
    """

    def __init__(self, shape, n: int, seed: int, dtype: torch.dtype = torch.float32) -> None:
        self.shape = tuple(int(s) for s in shape)
        self.n, self.seed, self.dtype = int(n), int(seed), dtype
        self.per_sample = math.prod(self.shape)
        self.total = self.n * self.per_sample
        self._gen: torch.Generator | None = None
        self._pos = 0  # uniforms the generator has consumed (a multiple of 16)
        self._tail: torch.Tensor | None = None

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """x_T of samples ``[start, stop)``, a new CPU tensor."""
        if not 0 <= start <= stop <= self.n:
            raise ValueError(f"rows [{start}, {stop}) are outside the run's {self.n} samples")
        if self.total < _BLOCK:  # torch draws these one by one (another path): a few values, drawn whole
            whole = torch.randn((self.n, *self.shape), generator=torch.Generator().manual_seed(self.seed))
            return whole[start:stop].to(self.dtype)
        lo, hi = start * self.per_sample, stop * self.per_sample
        body_end = self.total - (self.total % _BLOCK and _BLOCK)  # values before it come from their blocks
        flat = torch.empty(hi - lo)
        if lo < min(hi, body_end):
            a, b = lo - lo % _BLOCK, min(-(-hi // _BLOCK) * _BLOCK, self.total - self.total % _BLOCK)
            drawn = self._draw(a, b)
            m = min(hi, body_end) - lo
            flat[:m] = drawn[lo - a: lo - a + m]
        if hi > body_end:  # the last 16 values: redrawn from the 16 uniforms after all the others
            tail = self._tail_values()
            s = max(lo, body_end)
            flat[s - lo:] = tail[s - body_end: hi - body_end]
        return flat.view(stop - start, *self.shape).to(self.dtype)

    def _seek(self, pos: int) -> None:
        if self._gen is None or pos < self._pos:
            self._gen, self._pos = torch.Generator().manual_seed(self.seed), 0
        while self._pos < pos:
            k = min(_SKIP_CHUNK, pos - self._pos)
            torch.randn(k, generator=self._gen)
            self._pos += k

    def _draw(self, a: int, b: int) -> torch.Tensor:
        """Normals of the aligned range ``[a, b)`` of the whole tensor's body."""
        self._seek(a)
        out = torch.randn(b - a, generator=self._gen)
        self._pos = b
        return out

    def _tail_values(self) -> torch.Tensor:
        if self._tail is None:
            full = self.total - self.total % _BLOCK  # uniforms drawn for the whole tensor
            self._seek(full)
            rest = self.total - full  # the body's leftover uniforms, drawn before the redraw
            if rest:
                torch.rand(rest, generator=self._gen)
            self._tail = torch.randn(_BLOCK, generator=self._gen)
            self._gen, self._pos = None, 0  # consumed past the body: the next batch restarts
        return self._tail
