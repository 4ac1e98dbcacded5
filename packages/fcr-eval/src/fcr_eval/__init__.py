"""Metrics, statistics, DuckDB results store and experiment runner for FCR.

Modules (import what you need; this package import stays light so apps can read the store
without importing torch):

* :mod:`fcr_eval.store` — the DuckDB results store (contract: docs/results-store.md).
* :mod:`fcr_eval.metrics.extractors`, :mod:`fcr_eval.metrics.quality` — feature extractors and quality records;
  :mod:`fcr_eval.metrics.frechet`, :mod:`fcr_eval.metrics.kid`, :mod:`fcr_eval.metrics.inception_score`,
  :mod:`fcr_eval.metrics.precision_recall` — the maths.
* :mod:`fcr_eval.metrics.class_agreement` (embedded default) and :mod:`fcr_eval.metrics.clip_score` — alignment.
* :mod:`fcr_eval.metrics.cost`, :mod:`fcr_eval.metrics.mechanism`, :mod:`fcr_eval.metrics.robustness`.
* :mod:`fcr_eval.analysis.stats`, :mod:`fcr_eval.analysis.criteria`, :mod:`fcr_eval.provenance`.
* :mod:`fcr_eval.spec.experiment`, :mod:`fcr_eval.plan.planner`, :mod:`fcr_eval.run.runner` — experiment files, plans
  and the runner; :mod:`fcr_eval.run.contexts` (embedded default / Stable Diffusion),
  :mod:`fcr_eval.run.distributed` (multi-process sharding), :mod:`fcr_eval.run.early_stopping` (moving
  validation that survives resume), :mod:`fcr_eval.report.plots`.
* :mod:`fcr_eval.testing` — tiny CLIP and stand-in Inception files for offline tests.
"""

__version__ = "0.1.0"
