"""Deterministic, resumable batch order.

The position in the data is one integer, the number of micro-batches consumed so far. Epoch
``e`` visits the dataset in the order ``randperm(n, seed + e)``; micro-batch ``m`` is slice
``m mod (n // global_batch)`` of epoch ``m // (n // global_batch)``, and each process takes its
own ``batch_size`` rows of that global batch. So a resumed run that starts at micro-batch ``m``
sees exactly the batches the uninterrupted run saw, on any number of workers.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

__all__ = ["ResumableBatchSampler"]


class ResumableBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Infinite batch sampler starting at micro-batch ``start``.

    Args:
        n: dataset size.
        batch_size: rows per process per micro-batch.
        seed: base seed of the per-epoch permutations.
        start: micro-batches already consumed (the resume position).
        rank / world_size: this process's slice of each global batch.
        shuffle: permute each epoch (else sequential order).
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, start: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True):
        global_batch = batch_size * world_size
        if n < global_batch:
            raise ValueError(
                f"dataset has {n} usable items, fewer than one global batch ({batch_size} x {world_size} processes); "
                "lower --batch-size or add data"
            )
        self.n, self.batch_size, self.seed, self.start = n, batch_size, seed, start
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.per_epoch = n // global_batch

    def order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))

    def __iter__(self) -> Iterator[list[int]]:
        m = self.start
        epoch, perm = None, None
        while True:
            e, pos = divmod(m, self.per_epoch)
            if e != epoch:
                epoch, perm = e, self.order(e)
            lo = (pos * self.world_size + self.rank) * self.batch_size
            yield perm[lo : lo + self.batch_size].tolist()
            m += 1
