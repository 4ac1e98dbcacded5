"""The ``[finetune]`` table (and its ``[finetune.early_stopping]``): how a variation's weights are
fine-tuned — data, steps, optimiser, the objective's Δ sampling, checkpoints, early stopping.

Example::

    finetune = load_finetune(chk, raw.get("finetune", {}), datasets)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fcr_sample.vocabulary import BLOCK_GROUPS as BLOCKS
from fcr_train.vocabulary import DELTA_UNITS, DISTANCES

from fcr_eval.spec.checker import Checker
from fcr_eval.spec.datasets import DatasetSpec, dataset_ref
from fcr_eval.spec.vocabulary import EARLY_STOPPING_METRICS, MIXED_PRECISIONS, OPTIMIZERS

__all__ = ["EarlyStoppingSpec", "FinetuneSpec", "load_finetune"]


@dataclass(frozen=True)
class EarlyStoppingSpec:
    """Early stopping on a moving quality metric over a mini validation set."""

    metric: str = "fd_moving"
    every: int = 500
    mini_val_size: int = 3000
    window: int = 3
    patience: int = 3
    mini_val: str | None = None


@dataclass(frozen=True)
class FinetuneSpec:
    data: str | None = None
    steps: int = 10_000
    batch_size: int = 128
    lr: float = 1e-5
    optimizer: str = "adamw"
    weight_decay: float = 1e-2
    warmup_steps: int = 0
    delta_max: int = 10
    delta_unit: str = "timesteps"  # "sampler_steps": Δ counts steps of this experiment's sampler
    distance: str = "mse"  # fcr_train.loss.DISTANCES
    blocks: str = "all"
    ema_decay: float | None = None
    checkpoint_every: int = 500
    per_seed: bool = True
    mixed_precision: str = "no"
    cond_dropout: float = 0.1
    early_stopping: EarlyStoppingSpec | None = None


def load_finetune(chk: Checker, raw: Any, datasets: dict[str, DatasetSpec]) -> FinetuneSpec:
    """``[finetune]`` → :class:`FinetuneSpec`, checked (its early stopping too)."""
    finetune = chk.build(FinetuneSpec, raw, "finetune")
    chk.one_of(finetune.blocks, BLOCKS, "finetune.blocks", "finetune", "blocks")
    chk.one_of(finetune.delta_unit, DELTA_UNITS, "finetune.delta_unit", "finetune", "delta_unit")
    chk.one_of(finetune.distance, DISTANCES, "finetune.distance", "finetune", "distance")
    chk.one_of(finetune.optimizer, OPTIMIZERS, "finetune.optimizer", "finetune", "optimizer")
    chk.one_of(finetune.mixed_precision, MIXED_PRECISIONS, "finetune.mixed_precision", "finetune",
               "mixed_precision")
    for k in ("steps", "batch_size", "delta_max", "checkpoint_every"):
        if getattr(finetune, k) < 1:
            chk.fail(f"finetune.{k} = {getattr(finetune, k)} must be >= 1", "finetune", k)
    if finetune.lr <= 0:
        chk.fail(f"finetune.lr = {finetune.lr} must be > 0", "finetune", "lr")
    for k in ("warmup_steps", "weight_decay"):
        if getattr(finetune, k) < 0:
            chk.fail(f"finetune.{k} = {getattr(finetune, k)} must be >= 0", "finetune", k)
    if not 0.0 <= finetune.cond_dropout <= 1.0:
        chk.fail(f"finetune.cond_dropout = {finetune.cond_dropout} must be a probability in [0, 1]", "finetune",
                 "cond_dropout")
    if finetune.ema_decay is not None and not 0.0 <= finetune.ema_decay < 1.0:
        chk.fail(f"finetune.ema_decay = {finetune.ema_decay} must be in [0, 1)", "finetune", "ema_decay")
    dataset_ref(chk, datasets, finetune.data, "finetune.data", "finetune", "data", roles=("finetune",))
    if finetune.early_stopping is not None:
        es = finetune.early_stopping
        chk.one_of(es.metric, EARLY_STOPPING_METRICS, "finetune.early_stopping.metric",
                   "finetune.early_stopping", "metric")
        for k in ("every", "mini_val_size", "window", "patience"):
            if getattr(es, k) < 1:
                chk.fail(f"finetune.early_stopping.{k} must be >= 1", "finetune.early_stopping", k)
        dataset_ref(chk, datasets, es.mini_val, "finetune.early_stopping.mini_val", "finetune.early_stopping",
                    "mini_val", roles=("mini_val", "eval"))
    return finetune

