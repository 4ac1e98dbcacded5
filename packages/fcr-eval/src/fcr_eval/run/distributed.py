"""The processes of a multi-process run (``accelerate launch`` or ``torchrun``), or just this one.

The runner spreads each run's batches over the processes (:class:`fcr_eval.run.batches.BatchGrid`:
batch ``k`` is process ``k mod P``'s); every process samples and evaluates its batches and writes
them into the run folder (per-image values, feature rows, sample PNGs), the main process reads
them all, computes the metrics and is the only one that writes to the store. Sample ``i`` starts
from the same x_T, in the same batch, whatever the number of processes, so the processes change
which device draws an image, not the image.

Launch (one process per GPU; on CPU, ``torchrun`` with the gloo backend)::

    accelerate launch -m fcr_eval.cli run experiments/exp-1-main-ablation.toml
    torchrun --nproc_per_node 2 -m fcr_eval.cli run experiments/mini-exp-1.toml --device cpu

Example:
    >>> procs = Processes.from_environment(cpu=True)
    >>> BatchGrid(1000, 64).assigned(procs.index, procs.count)   # this process's batches
    >>> procs.barrier()                                           # every batch is on disk
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["Processes", "launched_processes"]


def launched_processes() -> int:
    """How many processes the launcher (torchrun, accelerate, MPI) started for this run: 1 when none
    did. Reads the environment only (no torch), so the CLI can ask before loading anything."""
    for key in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        if os.environ.get(key):
            return int(os.environ[key])
    return 1


@dataclass
class Processes:
    """``index`` of this process among ``count``; collective helpers that are no-ops for one."""

    index: int = 0
    count: int = 1
    device: torch.device | None = None
    _state: object | None = None

    @classmethod
    def from_environment(cls, cpu: bool = False) -> Processes:
        """Join the launcher's process group when one is set up (WORLD_SIZE > 1), else a single process."""
        if launched_processes() <= 1:
            return cls()
        from accelerate import PartialState

        state = PartialState(cpu=cpu)
        return cls(state.process_index, state.num_processes, state.device, state)

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def barrier(self) -> None:
        if self._state is not None:
            self._state.wait_for_everyone()

    def broadcast(self, obj):
        """The main process's ``obj`` on every process."""
        if self._state is None:
            return obj
        from accelerate.utils import broadcast_object_list

        box = [obj if self.is_main else None]
        broadcast_object_list(box)
        return box[0]

    def describe(self) -> dict:
        return {"processes": self.count, "process_index": self.index}
