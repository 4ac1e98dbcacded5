"""A results store of any size for scale tests and benchmarks, built inside DuckDB.

``build_synthetic_store(path, sample_metric_rows=10_000_000)`` creates the schema through
fcr-eval's own migrations (:class:`fcr_eval.store.ResultsStore`) and then fills every table with
``INSERT ... SELECT`` over ``range()``, so that 10M per-sample rows take seconds, not the minutes
a Python loop would. The rows look like a full exp-1: experiments × variations (no cache, FD-5 …
FD-20, a λ = 0 control and FCR fine-tunes, DeepCache) × seeds, each run with one value per
sample of every per-sample metric, stored in the order the writer stores them (a run's rows
together, one metric after another), plus proportional samples, per-prompt scores, run-level
metrics, timings, feature statistics, contrasts and criteria. The values are made up
(deterministic hashes); every run's ``params`` says ``"synthetic": true``.

Test support, not shipped: ``test_scale.py`` and ``benchmarks/explorer_scale.py`` (which puts the
repository root on ``sys.path``) import it as ``tests.apps.results_explorer.synthetic_store``.

Example:
    >>> info = build_synthetic_store("/tmp/scale/fcr.duckdb", sample_metric_rows=1_000_000)
    >>> info.sample_metric_rows, info.runs
    (1000020, 60)
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import duckdb
from fcr_eval.store import ResultsStore
from fcr_eval.store.migrations import SCHEMA_VERSION

logger = logging.getLogger(__name__)

#: (variation, sampler, stride, λ, mean cache_mse) of each synthetic experiment.
VARIATIONS: tuple[tuple[str, str, int | None, float | None, float], ...] = (
    ("none", "none", None, None, 0.0),
    ("fd-5", "fd", 5, None, 0.004),
    ("fd-10", "fd", 10, None, 0.012),
    ("fd-15", "fd", 15, None, 0.019),
    ("fd-20", "fd", 20, None, 0.026),
    ("ctrl-fd-10", "fd", 10, 0.0, 0.0118),
    ("fcr-0.05-fd-10", "fd", 10, 0.05, 0.0095),
    ("fcr-0.10-fd-10", "fd", 10, 0.10, 0.0083),
    ("fcr-0.20-fd-10", "fd", 10, 0.20, 0.0079),
    ("deepcache-5", "deepcache", 5, None, 0.006),
)
SAMPLE_METRICS = ("cache_mse", "cache_psnr", "cache_feature_l2", "class_correct", "class_logprob")


@dataclass(frozen=True)
class SyntheticStoreInfo:
    """What :func:`build_synthetic_store` wrote."""

    path: Path
    experiments: int
    runs: int
    samples_per_run: int
    sample_metric_rows: int
    seconds: float


def build_synthetic_store(
    path: str | Path,
    *,
    sample_metric_rows: int = 10_000_000,
    experiments: int = 2,
    seeds: int = 3,
    threads: int | None = None,
) -> SyntheticStoreInfo:
    """Create a new store at ``path`` with about ``sample_metric_rows`` per-sample rows.

    Args:
        path: the store file; it must not exist yet.
        sample_metric_rows: target row count of ``sample_metrics`` (rounded up to whole samples).
        experiments: how many copies of the exp-1-like design (``scale-exp-<i>``).
        seeds: run seeds per variation.
        threads: DuckDB threads for building (default: DuckDB's).

    Returns:
        :class:`SyntheticStoreInfo` with the counts and the build time.

    Raises:
        FileExistsError: ``path`` exists (the builder never appends to a real store).
        ValueError: a count below 1.

    Example:
        >>> build_synthetic_store("/tmp/s/fcr.duckdb", sample_metric_rows=100_000).runs
        60
    """
    import time

    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists; the synthetic store is built into a new file only")
    if min(sample_metric_rows, experiments, seeds) < 1:
        raise ValueError("sample_metric_rows, experiments and seeds must all be >= 1")
    t0 = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    ResultsStore(path)  # the schema, through fcr-eval's migrations
    n_runs = experiments * len(VARIATIONS) * seeds
    per_run = math.ceil(sample_metric_rows / (n_runs * len(SAMPLE_METRICS)))
    con = duckdb.connect(str(path))
    try:
        con.execute("SET enable_progress_bar = false")
        if threads:
            con.execute(f"SET threads = {int(threads)}")
        version = con.execute("SELECT max(version) FROM schema_version").fetchall()[0][0]
        if version != SCHEMA_VERSION:
            raise RuntimeError(f"store at schema {version}, expected {SCHEMA_VERSION}")
        _fill(con, experiments, seeds, per_run)
        con.execute("CHECKPOINT")
    finally:
        con.close()
    info = SyntheticStoreInfo(path, experiments, n_runs, per_run,
                              n_runs * per_run * len(SAMPLE_METRICS), time.perf_counter() - t0)
    logger.info("synthetic store %s: %d runs, %d per-sample rows in %.1f s", path, info.runs,
                info.sample_metric_rows, info.seconds)
    return info


def _fill(con: duckdb.DuckDBPyConnection, experiments: int, seeds: int, per_run: int) -> None:
    con.execute("CREATE TEMP TABLE v (vi INTEGER, variation VARCHAR, sampler VARCHAR, stride INTEGER, "
                "lambda_fcr DOUBLE, mse DOUBLE)")
    con.executemany("INSERT INTO v VALUES (?, ?, ?, ?, ?, ?)",
                    [[i, *row] for i, row in enumerate(VARIATIONS)])
    # One run per (experiment, variation, seed); ri numbers them in the order written.
    con.execute(
        f"""
        CREATE TEMP TABLE rr AS
        SELECT (e.e * {len(VARIATIONS)} + v.vi) * {seeds} + s.s AS ri, e.e, v.*, s.s AS seed,
               'scale-exp-' || e.e AS experiment_id,
               'scale-exp-' || e.e || '/' || v.variation || '/s' || s.s || '/'
                 || substr(md5(e.e || v.variation || s.s), 1, 16) AS run_id
        FROM range({experiments}) e(e), v, range({seeds}) s(s)
        """
    )
    con.execute(
        """
        INSERT INTO runs (run_id, experiment_id, variation_id, seed, status, model, dataset, sampler,
                          stride, parallel_decoding, lambda_fcr, delta_max, blocks, scheduler, resolution,
                          num_inference_steps, guidance_scale, params, config, code_version, device,
                          started_at, finished_at, cache_label, cache_key_steps, cache_interval)
        SELECT run_id, experiment_id, variation, seed, 'finished', 'embedded-unet', 'fashion-mnist',
               sampler, stride, CASE WHEN sampler = 'fd' THEN true END, lambda_fcr,
               CASE WHEN lambda_fcr IS NOT NULL THEN 10 END, CASE WHEN lambda_fcr IS NOT NULL THEN 'all' END,
               'ddim', 28, 20, 2.0, '{"synthetic": true}', '{}', 'synthetic', 'cpu: 2 cores',
               TIMESTAMP '2026-12-01 00:00:00' + INTERVAL (ri) MINUTE,
               TIMESTAMP '2026-12-01 00:05:00' + INTERVAL (ri) MINUTE,
               CASE WHEN sampler = 'fd' THEN 'FD-' || stride WHEN sampler = 'deepcache'
                    THEN 'DeepCache-N' || stride || '-b0' ELSE 'none' END,
               CASE WHEN stride IS NOT NULL THEN range(0, 20, stride) END, stride
        FROM rr ORDER BY ri
        """
    )
    # Per-sample rows: one range over runs × metrics × samples, in the writer's order (a run's
    # rows together, one metric after another), so row-group statistics look like a real store's.
    metrics = "[" + ", ".join(f"'{m}'" for m in SAMPLE_METRICS) + "]"
    n_m = len(SAMPLE_METRICS)
    n_vs = len(VARIATIONS) * seeds
    con.execute("CREATE TEMP TABLE ids AS SELECT list(run_id ORDER BY ri) AS ids, "
                "list(mse ORDER BY ri) AS mse, list(seed ORDER BY ri) AS seeds, "
                "list(CASE WHEN sampler = 'none' THEN NULL ELSE 'scale-exp-' || e || '/none/s' || seed END "
                "ORDER BY ri) AS refs FROM rr")
    total = con.execute("SELECT count(*) FROM rr").fetchall()[0][0] * n_m * per_run
    con.execute(
        f"""
        INSERT INTO sample_metrics (run_id, sample_index, prompt_id, seed, metric, value, reference)
        WITH g AS (
            SELECT i, i // {n_m * per_run} + 1 AS ri, (i // {per_run}) % {n_m} + 1 AS mi,
                   i % {per_run} AS k,
                   (hash(i // {n_m * per_run} // {n_vs}, (i // {n_m * per_run}) % {seeds}, i % {per_run}) % 1000003)
                     / 1000003.0 AS u,  -- shared by the variations of a seed: pairs pair
                   (hash(i) % 1000003) / 1000003.0 AS w
            FROM range({total}) t(i)
        )
        SELECT ids.ids[ri], k, 'p' || lpad(CAST(k AS VARCHAR), 6, '0'), ids.seeds[ri],
               {metrics}[mi],
               CASE mi
                 WHEN 1 THEN ids.mse[ri] * (0.5 + u + 0.2 * w)
                 WHEN 2 THEN CASE WHEN ids.mse[ri] = 0 THEN 'inf'::DOUBLE
                                  ELSE -10 * log10(ids.mse[ri] * (0.5 + u + 0.2 * w)) END
                 WHEN 3 THEN 40 * sqrt(ids.mse[ri] * (0.5 + u + 0.2 * w))
                 WHEN 4 THEN CASE WHEN u + 0.3 * w > 0.45 + 10 * ids.mse[ri] THEN 1.0 ELSE 0.0 END
                 ELSE ln(0.05 + 0.9 * u) - 5 * ids.mse[ri]
               END,
               ids.refs[ri]
        FROM g, ids ORDER BY i
        """
    )
    con.execute(
        """
        INSERT INTO sample_metric_definitions (run_id, metric, feature_extractor, preprocessing, n_samples,
                                               details)
        SELECT run_id, m.metric, CASE WHEN m.metric = 'cache_feature_l2' THEN 'efficientnet_lite0'
               WHEN m.metric LIKE 'class_%' THEN 'fashion_mnist_cnn' ELSE 'none' END, 'none', $n, '{}'
        FROM rr, (SELECT unnest($metrics) AS metric) m ORDER BY ri
        """,
        {"n": per_run, "metrics": list(SAMPLE_METRICS)},
    )
    # The rest, proportional: a sample row and a per-prompt score per sample, run-level metrics,
    # timings, σ²_Δ over Δ = 1..10 for four blocks.
    con.execute(
        f"""
        INSERT INTO samples (run_id, prompt_id, prompt, seed, image_path, class_label, width, height)
        SELECT rr.run_id, 'p' || lpad(CAST(k AS VARCHAR), 6, '0'), 'a photo of a thing number ' || k,
               rr.seed, 'samples/' || rr.variation || '/s' || rr.seed || '/' || k || '.png', 'thing', 28, 28
        FROM rr, range({per_run}) t(k) ORDER BY ri, k
        """
    )
    con.execute(
        f"""
        INSERT INTO per_prompt_scores (run_id, metric, prompt_id, value)
        SELECT rr.run_id, 'class_agreement', 'p' || lpad(CAST(k AS VARCHAR), 6, '0'),
               CASE WHEN hash(ri, k) % 10 < 8 THEN 1.0 ELSE 0.0 END
        FROM rr, range({per_run}) t(k) ORDER BY ri, k
        """
    )
    con.execute(
        """
        INSERT INTO metrics (run_id, metric, value, feature_extractor, preprocessing, n_samples, details)
        SELECT run_id, m.metric, m.base + 400 * mse + (hash(ri, m.metric) % 100) / 100.0,
               m.fe, 'resize_bilinear_224', $n, '{}'
        FROM rr, (VALUES ('fd_efficientnet_lite0', 18.0, 'efficientnet_lite0'),
                         ('kid_efficientnet_lite0', 0.02, 'efficientnet_lite0'),
                         ('class_agreement', 0.55, 'fashion_mnist_cnn')) m(metric, base, fe)
        ORDER BY ri
        """,
        {"n": per_run},
    )
    con.execute(
        """
        INSERT INTO timings (run_id, batch_size, sec_per_image, unet_calls, encoder_forwards,
                             decoder_forwards, flops_per_image, peak_memory_bytes, memory_kind, device,
                             n_images, warmup)
        SELECT run_id, bs, (0.02 + 0.06 / coalesce(stride, 1)) / bs, 20,
               CASE WHEN stride IS NULL THEN 20 ELSE CAST(ceil(20 / stride) AS INTEGER) END, 20,
               3e8, 600 * 1024 * 1024, 'process_rss', 'cpu: 2 cores', 64, 3
        FROM rr, (VALUES (1), (8)) b(bs) ORDER BY ri
        """
    )
    con.execute(
        """
        INSERT INTO feature_stats (run_id, block, delta, variance, n)
        SELECT run_id, b.block, d * 50, (0.05 - coalesce(lambda_fcr, 0) / 10) * d * b.w, 256
        FROM rr, range(1, 11) t(d),
             (VALUES ('all', 1.0), ('conv_in', 0.4), ('down_blocks.0', 0.8), ('mid_block', 1.5)) b(block, w)
        ORDER BY ri
        """
    )
    # Contrasts and criteria, as the runner stores them (numbers made up, CIs around them).
    con.execute(
        """
        INSERT INTO contrasts (experiment_id, contrast_id, kind, metric, candidate, baseline, target, estimate,
                               ci_low, ci_high, confidence, n_samples, n_clusters, method, threshold, direction,
                               verdict, details, code_version, computed_at)
        SELECT 'scale-exp-' || e.e, c.cid, c.kind,
               'cache_mse', c.cand, c.base, c.target, c.est + e.e / 1000.0, c.est - 0.1 * abs(c.est) - 1e-4,
               c.est + 0.1 * abs(c.est) + 1e-4, 0.95, $pairs, $seeds, 'two-stage bootstrap (seed, sample)',
               c.thr, c.dir, CASE WHEN c.thr IS NULL THEN NULL ELSE 'INCONCLUSIVE' END, '{}', 'synthetic',
               TIMESTAMP '2026-12-02 00:00:00'
        FROM range($e) e(e), (VALUES
            ('stride-gap', 'difference', 'fd-10', 'fd-5', NULL, 0.008, NULL, NULL),
            ('fcr-effect', 'difference', 'fcr-0.10-fd-10', 'ctrl-fd-10', NULL, -0.0035, 0.0, 'at_most'),
            ('fcr-recovers-gap', 'recovered_fraction', 'fcr-0.10-fd-10', 'ctrl-fd-10', 'fd-5', 0.45, 0.3,
             'at_least'),
            ('fcr-cost', 'relative_difference', 'fcr-0.10-fd-10', 'fd-5', NULL, 0.03, 0.05, 'at_most'))
            c(cid, kind, cand, base, target, est, thr, dir)
        """,
        {"pairs": per_run * seeds, "seeds": seeds, "e": experiments},
    )
    con.execute(
        """
        INSERT INTO criteria (experiment_id, criterion, passed, value, threshold, details, evaluated_at,
                              code_version, verdict, ci_low, ci_high)
        SELECT 'scale-exp-' || e.e, c.name, c.passed, c.value, c.thr, '{}', TIMESTAMP '2026-12-02 00:00:00',
               'synthetic', c.verdict, c.lo, c.hi
        FROM range($e) e(e), (VALUES
            ('quality_delta', NULL, 0.04, 0.05, 'INCONCLUSIVE', 0.01, 0.07),
            ('speedup', true, 1.55, 1.4, 'PASS', 1.45, 1.66),
            ('extra_memory', false, 0.05, 0.02, 'FAIL', 0.031, 0.066)) c(name, passed, value, thr, verdict, lo, hi)
        """,
        {"e": experiments},
    )
