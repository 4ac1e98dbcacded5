"""Metrics, statistics, DuckDB results store and experiment runner for FCR.

One sub-package per concern; arrows point down only (``.importlinter`` at the repository root
states them and CI checks them)::

    cli          the fcr-eval command
    run/         execute a plan: sample, evaluate, fine-tune, store, time      (torch)
    report/      tables, criteria board, plots from a store
    plan/        the experiment resolved once into typed runs and fine-tunes
    store/       the DuckDB results store (db, migrations, ResultsStore)
    analysis/    statistics, contrasts, criteria, verdicts          (no store)
    metrics/     extractors, FD/KID/IS/PR, paired, cost, σ²_Δ       (no store)
    records      the typed rows every layer produces and the store persists
    spec/        the experiment schema and vocabularies             (no torch, no DuckDB)

``fcr_eval.testing`` (tiny CLIP and a stand-in Inception for offline tests) stands outside the
layers; the code version stored with every number is :func:`fcr_common.provenance.code_version`.
This package import stays light so apps can read the store without importing torch.
"""

__version__ = "0.1.0"
