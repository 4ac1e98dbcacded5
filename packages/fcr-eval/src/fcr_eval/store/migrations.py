"""The results store's schema: numbered migrations and the one function that applies them.

``schema_version(version, applied_at)`` records every migration applied; :data:`MIGRATIONS` are
numbered functions applied in order by :func:`apply_migrations` (which the human-study store
uses too), each inside its own transaction, whenever a writer opens a store that is behind.
Columns are only ever added, never renamed or removed (``docs/results-store.md``).

Example:
    >>> con = duckdb.connect(":memory:")
    >>> migrate(con) == SCHEMA_VERSION
    True
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Sequence
from itertools import pairwise

import duckdb

from fcr_eval.store.db import StoreError, StoreSchemaError, transaction, utcnow

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "Migration", "read_schema_version", "apply_migrations", "migrate"]

logger = logging.getLogger(__name__)


def _migration_1(con: duckdb.DuckDBPyConnection) -> None:
    """The contract of docs/results-store.md as first agreed."""
    con.execute(
        """
        CREATE TABLE runs (
            run_id VARCHAR PRIMARY KEY,
            experiment_id VARCHAR NOT NULL,
            variation_id VARCHAR NOT NULL,
            seed INTEGER NOT NULL,
            status VARCHAR NOT NULL,
            model VARCHAR,
            dataset VARCHAR,
            sampler VARCHAR,
            stride INTEGER,
            parallel_decoding BOOLEAN,
            lambda_fcr DOUBLE,
            delta_max INTEGER,
            blocks VARCHAR,
            scheduler VARCHAR,
            resolution INTEGER,
            num_inference_steps INTEGER,
            guidance_scale DOUBLE,
            params JSON,
            config JSON,
            code_version VARCHAR,
            device VARCHAR,
            started_at TIMESTAMP,
            finished_at TIMESTAMP
        )"""
    )
    con.execute(
        """
        CREATE TABLE metrics (
            run_id VARCHAR NOT NULL,
            metric VARCHAR NOT NULL,
            value DOUBLE,
            feature_extractor VARCHAR,
            preprocessing VARCHAR,
            n_samples INTEGER,
            details JSON
        )"""
    )
    con.execute(
        """
        CREATE TABLE per_prompt_scores (
            run_id VARCHAR NOT NULL,
            metric VARCHAR NOT NULL,
            prompt_id VARCHAR NOT NULL,
            value DOUBLE
        )"""
    )
    con.execute(
        """
        CREATE TABLE timings (
            run_id VARCHAR NOT NULL,
            batch_size INTEGER,
            sec_per_image DOUBLE,
            unet_calls INTEGER,
            encoder_forwards INTEGER,
            decoder_forwards INTEGER,
            flops_per_image DOUBLE,
            peak_memory_bytes BIGINT,
            memory_kind VARCHAR,
            device VARCHAR
        )"""
    )
    con.execute(
        """
        CREATE TABLE feature_stats (
            run_id VARCHAR NOT NULL,
            block VARCHAR NOT NULL,
            delta INTEGER NOT NULL,
            variance DOUBLE,
            n INTEGER
        )"""
    )
    con.execute(
        """
        CREATE TABLE samples (
            run_id VARCHAR NOT NULL,
            prompt_id VARCHAR,
            prompt VARCHAR,
            seed INTEGER,
            image_path VARCHAR,
            class_label VARCHAR,
            width INTEGER,
            height INTEGER
        )"""
    )
    con.execute(
        """
        CREATE TABLE criteria (
            experiment_id VARCHAR NOT NULL,
            criterion VARCHAR NOT NULL,
            passed BOOLEAN,
            value DOUBLE,
            threshold DOUBLE,
            details JSON,
            evaluated_at TIMESTAMP,
            code_version VARCHAR
        )"""
    )
    # Written by `fcr-human-study analyse`; created here so every store has the full contract.
    con.execute(
        """
        CREATE TABLE human_study_results (
            study_id VARCHAR,
            variation_a VARCHAR,
            variation_b VARCHAR,
            n_a INTEGER,
            n_b INTEGER,
            n_tie INTEGER,
            n_both_bad INTEGER,
            win_rate_a DOUBLE,
            ci_low DOUBLE,
            ci_high DOUBLE,
            p_value DOUBLE,
            analysed_at TIMESTAMP
        )"""
    )
    con.execute(
        """
        CREATE TABLE human_study_scores (
            study_id VARCHAR,
            variation VARCHAR,
            bt_score DOUBLE,
            ci_low DOUBLE,
            ci_high DOUBLE
        )"""
    )
    for table in ("metrics", "per_prompt_scores", "timings", "feature_stats", "samples"):
        con.execute(f"CREATE INDEX idx_{table}_run ON {table}(run_id)")


def _migration_2(con: duckdb.DuckDBPyConnection) -> None:
    """Additions (documented in docs/results-store.md): the run's folder, and how many images
    and warm-up calls each timing used."""
    con.execute("ALTER TABLE runs ADD COLUMN run_dir VARCHAR")
    con.execute("ALTER TABLE timings ADD COLUMN n_images INTEGER")
    con.execute("ALTER TABLE timings ADD COLUMN warmup INTEGER")


def _effective_schedule(sampler: str | None, stride: int | None, steps: int | None,
                        parallel_decoding: bool | None, config_json: str | None) -> dict | None:
    """The cache schedule an old run really ran, rebuilt from its stored settings with
    fcr-sample's own configs (the owner of key steps and labels; their API is stable), not with
    fcr-eval's planner, so that a frozen migration never follows later planner changes. ``None``
    when it cannot be told (no sampler or step count, or settings the sampler config refuses)."""
    try:
        from fcr_sample import DeepCacheConfig, EncoderCacheConfig
    except ModuleNotFoundError as e:
        raise StoreError("this results store was written before schema 3 and migrating it rebuilds its cache "
                         "schedules with fcr-sample, which is not installed: install fcr-eval[run] (pip install "
                         "'fcr-eval[run]') and open the store for writing once") from e

    if sampler is None or steps is None:
        return None
    if sampler == "none":
        return {"cache_label": "none", "cache_key_steps": None, "cache_interval": None}
    try:
        variation = (json.loads(config_json) if config_json else {}).get("variation") or {}
    except (json.JSONDecodeError, AttributeError):
        variation = {}
    try:
        if sampler == "fd":
            cache = EncoderCacheConfig(stride=stride, schedule=variation.get("schedule", "uniform"),
                                       parallel_decoding=True if parallel_decoding is None else bool(parallel_decoding))
            interval = int(cache.stride) if cache.key_steps is None and cache.schedule == "uniform" else None
        elif sampler == "deepcache":
            cache = DeepCacheConfig(cache_interval=stride,
                                    cache_branch_id=int(variation.get("cache_branch_id", 0) or 0))
            interval = int(cache.cache_interval) if getattr(cache, "skip_mode", "uniform") == "uniform" else None
        else:
            raise ValueError(f"unknown sampler {sampler!r}")
        key_steps = [int(k) for k in cache.key_steps_for(int(steps))]
        return {"cache_label": cache.label, "cache_key_steps": key_steps, "cache_interval": interval}
    except (ValueError, TypeError) as e:
        logger.warning("migration 3: no effective cache schedule for a %s run with stride %s over %s "
                       "steps (%s); its cache columns stay NULL", sampler, stride, steps, e)
        return None


def _migration_3(con: duckdb.DuckDBPyConnection) -> None:
    """The effective cache schedule as columns of ``runs`` (label, key steps, interval), so a
    plot or a query never re-derives it from ``stride`` (where e.g. FD-published ignores the
    stride). Rows already stored are back-filled from their stride, sampler, step count and the
    variation in ``config``; rows whose schedule cannot be rebuilt stay NULL."""
    con.execute("ALTER TABLE runs ADD COLUMN cache_label VARCHAR")
    con.execute("ALTER TABLE runs ADD COLUMN cache_key_steps INTEGER[]")
    con.execute("ALTER TABLE runs ADD COLUMN cache_interval INTEGER")
    rows = con.execute(
        "SELECT run_id, sampler, stride, num_inference_steps, parallel_decoding, config FROM runs"
    ).fetchall()
    updates = []
    for run_id, *settings in rows:
        schedule = _effective_schedule(*settings)
        if schedule is not None:
            updates.append([schedule["cache_label"], schedule["cache_key_steps"], schedule["cache_interval"], run_id])
    if updates:
        con.executemany(
            "UPDATE runs SET cache_label = ?, cache_key_steps = ?, cache_interval = ? WHERE run_id = ?", updates
        )
        logger.info("migration 3: back-filled the cache schedule of %d of %d runs", len(updates), len(rows))


def _migration_4(con: duckdb.DuckDBPyConnection) -> None:
    """Paired evaluation: per-sample metrics (with their definitions once per run and metric),
    contrasts, and the CI and verdict of a criterion."""
    # No index on run_id: a run's rows are inserted together, so DuckDB's per-row-group min/max
    # already skips the others, and an index would slow the bulk insert of millions of rows.
    con.execute(
        """
        CREATE TABLE sample_metrics (
            run_id VARCHAR NOT NULL,
            sample_index INTEGER NOT NULL,
            prompt_id VARCHAR,
            seed INTEGER,
            metric VARCHAR NOT NULL,
            value DOUBLE,
            reference VARCHAR
        )"""
    )
    con.execute(
        """
        CREATE TABLE sample_metric_definitions (
            run_id VARCHAR NOT NULL,
            metric VARCHAR NOT NULL,
            feature_extractor VARCHAR,
            preprocessing VARCHAR,
            n_samples INTEGER,
            details JSON
        )"""
    )
    con.execute(
        """
        CREATE TABLE contrasts (
            experiment_id VARCHAR NOT NULL,
            contrast_id VARCHAR NOT NULL,
            kind VARCHAR NOT NULL,
            metric VARCHAR NOT NULL,
            candidate VARCHAR NOT NULL,
            baseline VARCHAR NOT NULL,
            target VARCHAR,
            estimate DOUBLE,
            ci_low DOUBLE,
            ci_high DOUBLE,
            confidence DOUBLE,
            n_samples INTEGER,
            n_clusters INTEGER,
            method VARCHAR,
            threshold DOUBLE,
            direction VARCHAR,
            verdict VARCHAR,
            details JSON,
            code_version VARCHAR,
            computed_at TIMESTAMP
        )"""
    )
    con.execute("ALTER TABLE criteria ADD COLUMN verdict VARCHAR")
    con.execute("ALTER TABLE criteria ADD COLUMN ci_low DOUBLE")
    con.execute("ALTER TABLE criteria ADD COLUMN ci_high DOUBLE")
    # Verdicts stored before this migration: PASS / FAIL from `passed` (NULL stays not evaluated).
    con.execute("UPDATE criteria SET verdict = CASE WHEN passed THEN 'PASS' ELSE 'FAIL' END "
                "WHERE passed IS NOT NULL")


def _migration_5(con: duckdb.DuckDBPyConnection) -> None:
    """σ²_Δ next to the feature's energy, and the unit the Δ range was drawn in: ``delta`` stays in
    DDPM timesteps (unambiguous); ``delta_unit`` says whether the measurement spanned the cache's
    range in sampler steps or the paper's literal range in timesteps. Old rows are the literal
    range (``'timesteps'``) with unknown energy (NULL)."""
    con.execute("ALTER TABLE feature_stats ADD COLUMN energy DOUBLE")
    con.execute("ALTER TABLE feature_stats ADD COLUMN delta_unit VARCHAR DEFAULT 'timesteps'")
    con.execute("UPDATE feature_stats SET delta_unit = 'timesteps' WHERE delta_unit IS NULL")


def _migration_6(con: duckdb.DuckDBPyConnection) -> None:
    """Interleaved timing rounds: one row per variation, batch size and round of an experiment's
    timing session, in which every variation is timed back to back in each round (alternating
    order), so speed-ups pair by round and carry a CI (:func:`fcr_eval.analysis.criteria.timing_criteria`)."""
    con.execute(
        """
        CREATE TABLE timing_rounds (
            experiment_id VARCHAR NOT NULL,
            variation_id VARCHAR NOT NULL,
            run_id VARCHAR,
            batch_size INTEGER NOT NULL,
            round INTEGER NOT NULL,
            position INTEGER,
            sec_per_image DOUBLE,
            peak_memory_bytes BIGINT,
            memory_kind VARCHAR,
            device VARCHAR,
            code_version VARCHAR,
            measured_at TIMESTAMP
        )"""
    )


def _migration_7(con: duckdb.DuckDBPyConnection) -> None:
    """Cache-error attribution on the sampling trajectory: per run, per served step and cached
    feature (``'all'`` for the step as a whole), one row per quantity of
    ``fcr_sample.attribute_cache_error`` (one-step ε / x0 errors, only-stale and only-fresh
    errors, feature change and energy, decoder gain, propagation to the final sample), measured on
    the run's first ``n_samples`` samples."""
    con.execute(
        """
        CREATE TABLE cache_attribution (
            run_id VARCHAR NOT NULL,
            step INTEGER NOT NULL,
            timestep DOUBLE,
            feature VARCHAR NOT NULL,
            quantity VARCHAR NOT NULL,
            value DOUBLE,
            n_samples INTEGER
        )"""
    )


def _migration_8(con: duckdb.DuckDBPyConnection) -> None:
    """A second fine-tuning objective: ``runs.lambda_oc``, the weight of the output-consistency
    term (``fcr_train.output_consistency``) of the run's fine-tune; NULL for the model's own
    weights and for FCR fine-tunes (``lambda_fcr``; an output-consistency run has NULL there). Rows
    stored before version 8 are FCR or no fine-tune and keep NULL."""
    con.execute("ALTER TABLE runs ADD COLUMN lambda_oc DOUBLE")


#: Numbered migrations; ``MIGRATIONS[i]`` brings a store from version ``i`` to ``i + 1``.
MIGRATIONS: tuple[Callable[[duckdb.DuckDBPyConnection], None], ...] = (
    _migration_1, _migration_2, _migration_3, _migration_4, _migration_5, _migration_6,
    _migration_7, _migration_8,
)
SCHEMA_VERSION = len(MIGRATIONS)


#: One migration: SQL (one or more statements) or a function of the connection.
Migration = str | Callable[[duckdb.DuckDBPyConnection], None]

_IDENTIFIER_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _version_table(table: str) -> str:
    if not _IDENTIFIER_RE.fullmatch(table):
        raise ValueError(f"schema-version table name must be a plain SQL identifier, got {table!r}")
    return table


def read_schema_version(con: duckdb.DuckDBPyConnection, *, table: str = "schema_version") -> int:
    """The highest version recorded in ``table`` (0 when the table does not exist or is empty).

    Example:
        >>> read_schema_version(duckdb.connect(":memory:"))
        0
    """
    table = _version_table(table)
    exists = con.execute(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [table]
    ).fetchone()[0]
    if not exists:
        return 0
    v = con.execute(f"SELECT max(version) FROM {table}").fetchone()[0]
    return int(v or 0)


def apply_migrations(
    con: duckdb.DuckDBPyConnection,
    migrations: Sequence[tuple[int, Migration]],
    *,
    table: str = "schema_version",
    target: int | None = None,
    newer_error: Callable[[int, int], BaseException] | None = None,
) -> int:
    """Bring ``con``'s database to version ``target`` with the numbered ``migrations`` it lacks.

    The version reached is kept in ``table(version INTEGER, applied_at TIMESTAMP)`` (created if
    missing), one row per migration applied. Each migration runs in its own transaction together
    with its row, so a failing one is rolled back and leaves the database at the previous version.
    Both the results store and the human-study store migrate through this function.

    Args:
        con: an open, writable DuckDB connection with no transaction in progress.
        migrations: ``(version, migration)`` pairs in increasing version order; a migration is
            SQL text or ``fn(con)``. Versions at or below the database's are skipped.
        table: the schema-version table.
        target: stop at this version (default: the last migration's).
        newer_error: ``fn(db_version, latest_known) -> exception`` raised when the database is
            at a version newer than the last migration (default: :class:`StoreSchemaError`).

    Returns:
        The version the database is at afterwards.

    Raises:
        StoreSchemaError: ``target`` is beyond the last migration, or (by default) the database
            is newer than the migrations.
        ValueError: versions not positive and strictly increasing, or a bad ``table`` name.

    Example:
        >>> con = duckdb.connect(":memory:")
        >>> apply_migrations(con, [(1, "CREATE TABLE votes (choice VARCHAR)"),
        ...                        (2, lambda c: c.execute("ALTER TABLE votes ADD COLUMN rater VARCHAR"))])
        2
    """
    table = _version_table(table)
    versions = [int(v) for v, _ in migrations]
    if any(v < 1 for v in versions) or any(a >= b for a, b in pairwise(versions)):
        raise ValueError(f"migration versions must be positive and strictly increasing, got {versions}")
    latest = versions[-1] if versions else 0
    target = latest if target is None else int(target)
    if target > latest:
        raise StoreSchemaError(f"no migration to version {target}; the migrations go up to {latest}")
    con.execute(f"CREATE TABLE IF NOT EXISTS {table} (version INTEGER, applied_at TIMESTAMP)")
    current = read_schema_version(con, table=table)
    if current > latest:
        if newer_error is not None:
            raise newer_error(current, latest)
        raise StoreSchemaError(f"the database is at schema version {current} ({table}) but the migrations "
                               f"go only up to {latest}; upgrade the code before writing to it")
    for version, migration in migrations:
        if version <= current or version > target:
            continue
        with transaction(con):
            if isinstance(migration, str):
                con.execute(migration)
            else:
                migration(con)
            con.execute(f"INSERT INTO {table} VALUES (?, ?)", [version, utcnow()])
        logger.info("migrated to schema version %d (%s)", version, table)
    return max(current, target)


def migrate(con: duckdb.DuckDBPyConnection, target: int | None = None) -> int:
    """Apply the numbered results-store migrations that ``con``'s database lacks, up to ``target``.

    See :func:`apply_migrations`: a failed migration leaves the store at the previous version.
    Returns the version reached.

    Example:
        >>> con = duckdb.connect(":memory:"); migrate(con) == SCHEMA_VERSION
        True
    """
    return apply_migrations(
        con, list(enumerate(MIGRATIONS, start=1)), target=target,
        newer_error=lambda current, latest: StoreSchemaError(
            f"the store is at schema version {current} but this fcr-eval knows only up to "
            f"{latest}; upgrade fcr-eval (uv sync) before writing to it"),
    )

