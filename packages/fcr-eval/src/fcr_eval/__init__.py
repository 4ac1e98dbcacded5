"""Metrics, statistics, DuckDB results store and experiment runner for FCR.

Modules (import what you need; this package import stays light so apps can read the store
without importing torch):

* :mod:`fcr_eval.store` — the DuckDB results store (contract: docs/results-store.md).
* :mod:`fcr_eval.extractors`, :mod:`fcr_eval.quality` — feature extractors and quality records;
  :mod:`fcr_eval.frechet`, :mod:`fcr_eval.kid`, :mod:`fcr_eval.inception_score`,
  :mod:`fcr_eval.precision_recall` — the maths.
* :mod:`fcr_eval.class_agreement` (embedded default) and :mod:`fcr_eval.clip_score` — alignment.
* :mod:`fcr_eval.cost`, :mod:`fcr_eval.mechanism`, :mod:`fcr_eval.robustness`.
* :mod:`fcr_eval.stats`, :mod:`fcr_eval.criteria`, :mod:`fcr_eval.provenance`.
* :mod:`fcr_eval.experiment`, :mod:`fcr_eval.planner`, :mod:`fcr_eval.runner` — experiment files, plans
  and the runner; :mod:`fcr_eval.contexts` (embedded default / Stable Diffusion),
  :mod:`fcr_eval.distributed` (multi-process sharding), :mod:`fcr_eval.early_stopping` (moving
  validation that survives resume), :mod:`fcr_eval.plots`.
* :mod:`fcr_eval.testing` — tiny CLIP and stand-in Inception files for offline tests.
"""

__version__ = "0.1.0"
