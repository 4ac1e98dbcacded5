"""The explorer's SQL: every aggregate is computed in DuckDB, only small frames reach Python.

Each function takes a :class:`~fcr_results_explorer.reader.StoreReader` and returns a polars
frame. Run filters are a :class:`RunFilter`; a filter on a column matches its values as text
(``'0.1'`` for λ = 0.1) and ``NONE`` stands for SQL NULL (no stride for a plain sampler, no λ
for a baseline).

Why one module of this size: every SQL the explorer runs is here, so the scale benchmark and the
indexes-or-not decisions look at one file; the views only render what these return.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import polars as pl
from fcr_eval.spec.vocabulary import SAMPLE_METRICS, metric_spec

from fcr_results_explorer.reader import HUMAN_STUDY_ALIAS, StoreReader
from fcr_results_explorer.stats import pool_seeds, with_ci

NONE = "none"

# Filterable run columns, in the order the sidebar shows them: (column, label).
FILTER_COLUMNS: tuple[tuple[str, str], ...] = (
    ("experiment_id", "Experiment"),
    ("model", "Model (backbone: embedded, emoji, SD)"),
    ("dataset", "Dataset"),
    ("sampler", "Sampler"),
    ("stride", "Stride"),
    ("lambda_fcr", "λ (FCR weight)"),
    ("lambda_oc", "λ (output consistency)"),
    ("delta_max", "Δ_max"),
    ("blocks", "Block subset"),
    ("scheduler", "Scheduler"),
    ("resolution", "Resolution"),
)

# Columns that describe a variation (constant over its seeds).
PARAM_COLUMNS: tuple[str, ...] = (
    "model",
    "dataset",
    "sampler",
    "stride",
    "parallel_decoding",
    "lambda_fcr",
    "lambda_oc",
    "delta_max",
    "blocks",
    "scheduler",
    "resolution",
    "num_inference_steps",
    "guidance_scale",
)

TIMING_COLUMNS: tuple[str, ...] = (
    "sec_per_image",
    "peak_memory_bytes",
    "flops_per_image",
    "unet_calls",
    "encoder_forwards",
    "decoder_forwards",
)
FEATURE_VARIANCE = "feature_variance"  # σ²_Δ averaged over Δ, one block
#: s/img from the experiment's interleaved timing session (every sampler timed back to back in each
#: round; the speed criteria read it), the mean over its rounds.
INTERLEAVED_SPEED = "sec_per_image_interleaved"

# Preferred quality metric, first one present wins: KID is unbiased at any sample size, where a
# Fréchet distance from fewer samples than feature dimensions is not estimable.
QUALITY_PREFERENCE = (
    "kid_inception",
    "kid_efficientnet_lite0",
    "clip_score",
    "fid_inception",
    "fd_efficientnet_lite0",
)


def lower_is_better(metric: str) -> bool:
    """Whether a smaller value of ``metric`` is better, as fcr-eval's metric registry states it
    (:func:`fcr_eval.spec.vocabulary.metric_spec`; a name it does not know counts as higher-is-better)."""
    spec = metric_spec(metric.partition("@bs")[0])
    return spec is not None and not spec.higher_is_better


def table_columns(reader: StoreReader, table: str) -> set[str]:
    """The columns of a table of the results store (empty when it does not exist): older stores
    lack columns that later migrations added, and the explorer reads them without migrating."""
    if not reader.has(table):
        return set()
    return set(reader.frame(
        "SELECT column_name FROM duckdb_columns() WHERE table_name = $t AND schema_name = 'main' "
        "AND database_name = current_database()", {"t": table})["column_name"].to_list())


def _text(col: str) -> str:
    return f"coalesce(CAST({col} AS VARCHAR), '{NONE}')"


@dataclass(frozen=True)
class RunFilter:
    """Selected values per run column; an empty selection keeps every run."""

    values: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def where(self, alias: str = "") -> tuple[str, dict[str, Any]]:
        prefix = f"{alias}." if alias else ""
        clauses, params = [], {}
        for col, _ in FILTER_COLUMNS:
            chosen = self.values.get(col)
            if chosen:
                clauses.append(f"list_contains($f_{col}, {_text(prefix + col)})")
                params[f"f_{col}"] = list(chosen)
        return (" AND ".join(clauses) or "TRUE"), params

    def runs_cte(self) -> tuple[str, dict[str, Any]]:
        """``r AS (...)``: the filtered runs."""
        where, params = self.where()
        return f"r AS (SELECT * FROM runs WHERE {where})", params


# -- store summary --------------------------------------------------------------------------


def table_counts(reader: StoreReader) -> dict[str, int]:
    tables = [t for t in ("runs", "metrics", "per_prompt_scores", "timings", "feature_stats",
                          "samples", "criteria", "sample_metrics", "contrasts") if reader.has(t)]
    if not tables:
        return {}
    sql = " UNION ALL ".join(f"SELECT '{t}' AS t, count(*) AS n FROM {t}" for t in tables)
    return {t: int(n) for t, n in reader.frame(sql).iter_rows()}


def filter_options(reader: StoreReader) -> dict[str, list[str]]:
    """Distinct values of every filterable column (as text, ``NONE`` for NULL)."""
    parts = [
        f"SELECT '{col}' AS col, v FROM (SELECT DISTINCT {_text(col)} AS v FROM runs)"
        for col, _ in FILTER_COLUMNS
    ]
    frame = reader.frame(" UNION ALL ".join(parts))
    out: dict[str, list[str]] = {col: [] for col, _ in FILTER_COLUMNS}
    for col, v in frame.iter_rows():
        out[col].append(v)
    for col, vals in out.items():
        out[col] = sorted(vals, key=_natural_key)
    return out


def _natural_key(v: str) -> tuple[int, float, str]:
    if v == NONE:
        return (0, 0.0, "")
    try:
        return (1, float(v), "")
    except ValueError:
        return (2, 0.0, v)


def count_runs(reader: StoreReader, flt: RunFilter) -> int:
    where, params = flt.where()
    return int(reader.frame(f"SELECT count(*) AS n FROM runs WHERE {where}", params)["n"][0])


# -- overview -------------------------------------------------------------------------------


def experiments_overview(reader: StoreReader, flt: RunFilter) -> pl.DataFrame:
    cte, params = flt.runs_cte()
    return reader.frame(
        f"""
        WITH {cte},
        st AS (SELECT experiment_id, status, count(*) AS k FROM r GROUP BY ALL),
        cv AS (SELECT experiment_id, code_version, count(*) AS k FROM r GROUP BY ALL)
        SELECT r.experiment_id AS experiment,
               count(DISTINCT r.variation_id) AS variations,
               count(*) AS runs,
               list(DISTINCT r.seed ORDER BY r.seed) AS seeds,
               (SELECT string_agg(status || ': ' || k, ', ' ORDER BY status) FROM st
                 WHERE st.experiment_id = r.experiment_id) AS status,
               (SELECT string_agg(coalesce(code_version, '?') || ' (' || k || ')', ', '
                       ORDER BY code_version) FROM cv
                 WHERE cv.experiment_id = r.experiment_id) AS code_versions,
               string_agg(DISTINCT r.device, ', ') AS devices,
               min(r.started_at) AS first_started,
               max(r.finished_at) AS last_finished
        FROM r GROUP BY r.experiment_id ORDER BY r.experiment_id
        """,
        params,
    )


def variations_overview(reader: StoreReader, flt: RunFilter, limit: int = 1000) -> pl.DataFrame:
    cte, params = flt.runs_cte()
    cols = ",\n".join(f"any_value({c}) AS {c}" for c in PARAM_COLUMNS)
    return reader.frame(
        f"""
        WITH {cte}
        SELECT experiment_id AS experiment, variation_id AS variation,
               count(*) AS runs, list(seed ORDER BY seed) AS seeds,
               string_agg(DISTINCT status, ', ') AS status,
               string_agg(DISTINCT code_version, ', ') AS code_versions,
               {cols},
               max(finished_at) AS last_finished
        FROM r GROUP BY ALL ORDER BY experiment, variation LIMIT {int(limit)}
        """,
        params,
    )


# -- metrics --------------------------------------------------------------------------------


def timing_batch_sizes(reader: StoreReader) -> list[int]:
    if not reader.has("timings"):
        return []
    return [
        int(b) for b in reader.frame(
            "SELECT DISTINCT batch_size FROM timings WHERE batch_size IS NOT NULL ORDER BY 1"
        )["batch_size"]
    ]


def interleaved_batch_sizes(reader: StoreReader) -> list[int]:
    """Batch sizes of the interleaved timing sessions in the store (none: no session ran)."""
    if not reader.has("timing_rounds"):
        return []
    return [int(b) for b in reader.frame(
        "SELECT DISTINCT batch_size FROM timing_rounds WHERE sec_per_image IS NOT NULL ORDER BY 1")["batch_size"]]


def unestimable(reader: StoreReader, metric: str) -> tuple[int, int] | None:
    """``(fewest samples, feature dimension)`` when stored rows of a Fréchet-distance ``metric``
    carry the flag that they are not estimable (decided once, with the record, by fcr-eval)."""
    from fcr_eval.records import unestimable_fd

    if not reader.has("metrics") or not metric.startswith(("fd_", "fid_")):
        return None
    rows = reader.frame("SELECT n_samples, CAST(details AS VARCHAR) AS details FROM metrics WHERE metric = $m",
                        {"m": metric})
    return unestimable_fd(rows) if rows.height else None


def metric_catalogue(reader: StoreReader) -> list[str]:
    """Every metric a run can be compared on: stored metrics, timings, σ²_Δ."""
    names: list[str] = []
    if reader.has("metrics"):
        names += reader.frame("SELECT DISTINCT metric FROM metrics ORDER BY 1")["metric"].to_list()
    sizes = timing_batch_sizes(reader)
    for col in TIMING_COLUMNS:
        if len(sizes) <= 1:
            names += [col] if sizes else []
        else:
            names += [f"{col}@bs{b}" for b in sizes]
    rounds = interleaved_batch_sizes(reader)
    names += ([INTERLEAVED_SPEED] if len(rounds) == 1 else [f"{INTERLEAVED_SPEED}@bs{b}" for b in rounds])
    if reader.has("feature_stats") and reader.frame(
        "SELECT count(*) AS n FROM (SELECT 1 FROM feature_stats LIMIT 1)"
    )["n"][0]:
        names.append(FEATURE_VARIANCE)
    return names


def default_quality_metric(catalogue: list[str]) -> str | None:
    for name in QUALITY_PREFERENCE:
        if name in catalogue:
            return name
    stored = [m for m in catalogue if m not in TIMING_COLUMNS and "@bs" not in m]
    return stored[0] if stored else None


def speed_metric(catalogue: list[str]) -> str | None:
    """The interleaved session's s/img where one ran (the figures the speed criteria read), else the
    per-run timings; the smallest batch size first (latency per image)."""
    speed = [m for m in catalogue if m.startswith(INTERLEAVED_SPEED)] or \
        [m for m in catalogue if m.startswith("sec_per_image")]
    return speed[0] if speed else None  # the smallest batch size: latency per image


def feature_blocks(reader: StoreReader) -> list[str]:
    if not reader.has("feature_stats"):
        return []
    blocks = reader.frame("SELECT DISTINCT block FROM feature_stats ORDER BY 1")["block"].to_list()
    return sorted(blocks, key=lambda b: (b != "all", b))


def feature_delta_units(reader: StoreReader) -> list[str]:
    """The Δ ranges ``feature_stats`` holds (``delta_unit``: ``'timesteps'``, the paper's literal
    1…Δ_max, or ``'sampler_steps'``, the cache's range); empty for a store before migration 5."""
    if "delta_unit" not in table_columns(reader, "feature_stats"):
        return []
    return reader.frame("SELECT DISTINCT delta_unit AS u FROM feature_stats WHERE delta_unit IS NOT NULL "
                        "ORDER BY 1")["u"].to_list()


def has_feature_energy(reader: StoreReader) -> bool:
    """Whether any ``feature_stats`` row has the feature's energy (σ²_Δ / energy is scale-free)."""
    if "energy" not in table_columns(reader, "feature_stats"):
        return False
    return bool(reader.frame("SELECT count(*) AS n FROM (SELECT 1 FROM feature_stats "
                             "WHERE energy IS NOT NULL LIMIT 1)")["n"][0])


def _variance_sql(delta_unit: str | None, scale_free: bool) -> tuple[str, str, dict[str, Any]]:
    """(value expression, extra WHERE clause, params) for σ²_Δ rows of one Δ range."""
    value = "variance / nullif(energy, 0)" if scale_free else "variance"
    if delta_unit is None:
        return value, "", {}
    return value, " AND delta_unit = $unit", {"unit": delta_unit}


def _run_values_sql(metric: str, block: str = "all", delta_unit: str | None = None,
                    scale_free: bool = False) -> tuple[str, dict[str, Any]]:
    """``SELECT run_id, value`` for one metric, one row per run (σ²_Δ: of one Δ range when
    ``delta_unit`` is given, divided by the feature's energy when ``scale_free``)."""
    base = metric.split("@bs")[0]
    if base == INTERLEAVED_SPEED:
        bs = " WHERE batch_size = $bs" if "@bs" in metric else ""
        return (f"SELECT run_id, avg(sec_per_image) AS value FROM timing_rounds{bs} GROUP BY run_id",
                {"bs": int(metric.split("@bs")[1])} if bs else {})
    if base in TIMING_COLUMNS:
        if "@bs" in metric:
            return (
                f"SELECT run_id, avg({base}) AS value FROM timings WHERE batch_size = $bs "
                "GROUP BY run_id",
                {"bs": int(metric.split("@bs")[1])},
            )
        return f"SELECT run_id, avg({base}) AS value FROM timings GROUP BY run_id", {}
    if metric == FEATURE_VARIANCE:
        value, unit, params = _variance_sql(delta_unit, scale_free)
        return (
            f"SELECT run_id, avg({value}) AS value FROM feature_stats WHERE block = $block{unit} "
            "GROUP BY run_id",
            {"block": block, **params},
        )
    return (
        "SELECT run_id, avg(value) AS value FROM metrics WHERE metric = $metric GROUP BY run_id",
        {"metric": metric},
    )


def metric_provenance(reader: StoreReader, metric: str) -> str:
    """What produced a stored metric: feature extractor, preprocessing, samples."""
    if not reader.has("metrics"):
        return ""
    frame = reader.frame(
        """SELECT DISTINCT feature_extractor, preprocessing, n_samples FROM metrics
           WHERE metric = $m ORDER BY ALL LIMIT 5""",
        {"m": metric},
    )
    parts = []
    for fe, pre, n in frame.iter_rows():
        bits = [b for b in (fe and f"features: {fe}", pre and f"preprocessing: {pre}",
                            n and f"n = {n}") if b]
        parts.append(", ".join(bits))
    return "; ".join(p for p in parts if p)


def metric_by_variation(
    reader: StoreReader, flt: RunFilter, metric: str, block: str = "all",
    delta_unit: str | None = None, scale_free: bool = False,
) -> pl.DataFrame:
    """One row per (experiment, variation): n seeds, mean, sd, 95% t-CI half-width, params.
    ``delta_unit`` / ``scale_free`` choose the Δ range and scale of σ²_Δ (:data:`FEATURE_VARIANCE`)."""
    cte, params = flt.runs_cte()
    vsql, vparams = _run_values_sql(metric, block, delta_unit, scale_free)
    cols = ",\n".join(f"any_value(r.{c}) AS {c}" for c in PARAM_COLUMNS)
    frame = reader.frame(
        f"""
        WITH {cte}, v AS ({vsql})
        SELECT r.experiment_id AS experiment, r.variation_id AS variation,
               count(v.value) AS n, avg(v.value) AS mean, stddev_samp(v.value) AS sd,
               min(v.value) AS min, max(v.value) AS max,
               list(r.seed ORDER BY r.seed) AS seeds,
               {cols}
        FROM r JOIN v USING (run_id)
        WHERE v.value IS NOT NULL
        GROUP BY r.experiment_id, r.variation_id
        ORDER BY experiment, variation
        """,
        {**params, **vparams},
    )
    return with_ci(frame).with_columns(pl.lit(metric).alias("metric"))


def metric_per_run(
    reader: StoreReader, flt: RunFilter, metric: str, block: str = "all", limit: int = 5000
) -> pl.DataFrame:
    cte, params = flt.runs_cte()
    vsql, vparams = _run_values_sql(metric, block)
    return reader.frame(
        f"""
        WITH {cte}, v AS ({vsql})
        SELECT r.experiment_id AS experiment, r.variation_id AS variation, r.seed, r.run_id,
               v.value
        FROM r JOIN v USING (run_id) ORDER BY ALL LIMIT {int(limit)}
        """,
        {**params, **vparams},
    )


def varying_params(frame: pl.DataFrame) -> tuple[list[str], dict[str, Any]]:
    """Split the parameter columns of a per-variation frame into varying and constant ones."""
    varying, constant = [], {}
    for col in PARAM_COLUMNS:
        if col not in frame.columns:
            continue
        uniq = frame[col].unique().to_list()
        if len(uniq) > 1:
            varying.append(col)
        elif uniq and uniq[0] is not None:
            constant[col] = uniq[0]
    return varying, constant


# -- mechanism ------------------------------------------------------------------------------


def variance_by_delta(reader: StoreReader, flt: RunFilter, block: str, delta_unit: str | None = None,
                      scale_free: bool = False) -> pl.DataFrame:
    """σ²_Δ per (experiment, variation, Δ in timesteps) over seeds, of one Δ range when
    ``delta_unit`` is given, divided by the feature's energy when ``scale_free``."""
    cte, params = flt.runs_cte()
    value, unit, uparams = _variance_sql(delta_unit, scale_free)
    frame = reader.frame(
        f"""
        WITH {cte}, f AS (SELECT run_id, delta, {value} AS v FROM feature_stats
                          WHERE block = $block{unit})
        SELECT r.experiment_id AS experiment, r.variation_id AS variation, f.delta,
               count(f.v) AS n, avg(f.v) AS mean, stddev_samp(f.v) AS sd
        FROM r JOIN f USING (run_id)
        GROUP BY ALL ORDER BY experiment, variation, f.delta
        """,
        {**params, "block": block, **uparams},
    )
    return with_ci(frame)


def variations_with_feature_stats(reader: StoreReader, flt: RunFilter) -> list[str]:
    cte, params = flt.runs_cte()
    return reader.frame(
        f"""WITH {cte} SELECT DISTINCT r.variation_id AS v FROM r
            WHERE EXISTS (SELECT 1 FROM feature_stats f WHERE f.run_id = r.run_id)
            ORDER BY 1 LIMIT 500""",
        params,
    )["v"].to_list()


# -- cache-error attribution (schema 7) -----------------------------------------------------


#: Per-feature quantities of ``cache_attribution`` a heat map can show (fcr-sample's names).
ATTRIBUTION_HEAT_QUANTITIES = ("only_stale_error", "only_fresh_error", "relative_change", "decoder_gain",
                               "change", "energy")
#: The step-wide quantities of the per-step table, in the order shown.
ATTRIBUTION_STEP_QUANTITIES = ("key_step", "eps_error", "x0_error", "relative_change", "decoder_gain",
                               "final_error")


def attribution_variations(reader: StoreReader, flt: RunFilter) -> pl.DataFrame:
    """The filtered (experiment, variation) pairs with attribution rows: ``experiment, variation,
    cache, runs, n_samples``; empty for a store before migration 7."""
    if not reader.has("cache_attribution"):
        return pl.DataFrame(schema={"experiment": pl.String, "variation": pl.String, "cache": pl.String,
                                    "runs": pl.Int64, "n_samples": pl.Int64})
    cte, params = flt.runs_cte()
    return reader.frame(
        f"""WITH {cte}, a AS (SELECT run_id, max(n_samples) AS n FROM cache_attribution GROUP BY run_id)
            SELECT r.experiment_id AS experiment, r.variation_id AS variation,
                   any_value(r.cache_label) AS cache, count(*) AS runs, max(a.n) AS n_samples
            FROM r JOIN a USING (run_id) GROUP BY 1, 2 ORDER BY 1, 2 LIMIT 500""",
        params,
    )


def attribution_cells(reader: StoreReader, flt: RunFilter, experiment: str, variation: str,
                      quantity: str) -> pl.DataFrame:
    """``step, feature, value, runs``: ``quantity`` per served step and cached feature of one
    variation, the mean over its filtered runs (seeds)."""
    cte, params = flt.runs_cte()
    return reader.frame(
        f"""WITH {cte} SELECT a.step, a.feature, avg(a.value) AS value, count(*) AS runs
            FROM cache_attribution a JOIN r USING (run_id)
            WHERE r.experiment_id = $exp AND r.variation_id = $var AND a.quantity = $q
              AND a.feature <> 'all'
            GROUP BY 1, 2 ORDER BY 1, 2""",
        {**params, "exp": experiment, "var": variation, "q": quantity},
    )


def attribution_steps(reader: StoreReader, flt: RunFilter, experiment: str, variation: str) -> pl.DataFrame:
    """One row per served step of one variation: its timestep and the step-wide quantities
    (:data:`ATTRIBUTION_STEP_QUANTITIES`, mean over the filtered runs; NULL where not measured)."""
    cte, params = flt.runs_cte()
    cols = ", ".join(f"avg(a.value) FILTER (WHERE a.quantity = '{q}') AS {q}" for q in ATTRIBUTION_STEP_QUANTITIES)
    return reader.frame(
        f"""WITH {cte} SELECT a.step, avg(a.timestep) AS timestep, {cols}
            FROM cache_attribution a JOIN r USING (run_id)
            WHERE r.experiment_id = $exp AND r.variation_id = $var AND a.feature = 'all'
            GROUP BY 1 ORDER BY 1""",
        {**params, "exp": experiment, "var": variation},
    )


# -- criteria -------------------------------------------------------------------------------


def latest_criteria(reader: StoreReader, experiments: tuple[str, ...]) -> pl.DataFrame:
    """The latest evaluation of every (experiment, criterion), with its ``verdict`` (PASS / FAIL
    / INCONCLUSIVE; from ``passed`` where no verdict is stored) and the value's CI
    (``ci_low`` / ``ci_high``, NULL where it has none or the store predates them)."""
    where = "list_contains($e, experiment_id)" if experiments else "TRUE"
    have = table_columns(reader, "criteria")
    from_passed = "CASE WHEN passed THEN 'PASS' WHEN NOT passed THEN 'FAIL' END"
    if {"verdict", "ci_low", "ci_high"} <= have:
        extra = f"coalesce(verdict, {from_passed}) AS verdict, ci_low, ci_high"
    else:
        extra = f"{from_passed} AS verdict, CAST(NULL AS DOUBLE) AS ci_low, CAST(NULL AS DOUBLE) AS ci_high"
    return reader.frame(
        f"""
        SELECT experiment_id AS experiment, criterion, passed, {extra}, value, threshold,
               CAST(details AS VARCHAR) AS details, evaluated_at, code_version
        FROM criteria WHERE {where}
        QUALIFY row_number() OVER (PARTITION BY experiment_id, criterion
                                   ORDER BY evaluated_at DESC) = 1
        ORDER BY experiment, criterion
        """,
        {"e": list(experiments)} if experiments else None,
    )


# -- samples --------------------------------------------------------------------------------


def sample_prompts(
    reader: StoreReader, flt: RunFilter, search: str = "", limit: int = 200,
    variations: list[str] | None = None,
) -> pl.DataFrame:
    """A page of prompts with samples, those shared by most runs first (``k``: runs with the
    prompt). With ``variations`` only their runs are read: a prompt of the side-by-side grid must
    be in them, and a store with millions of samples stays fast."""
    cte, params = flt.runs_cte()
    only = "AND list_contains($v, variation_id)" if variations else ""
    return reader.frame(
        f"""
        WITH {cte}
        SELECT s.prompt_id, min(s.prompt) AS prompt, count(*) AS k
        FROM samples s
        WHERE s.run_id IN (SELECT run_id FROM r WHERE TRUE {only})
          AND ($q = '' OR s.prompt ILIKE '%' || $q || '%' OR s.prompt_id = $q)
        GROUP BY s.prompt_id ORDER BY k DESC, s.prompt_id LIMIT {int(limit)}
        """,
        {**params, "q": search, **({"v": variations} if variations else {})},
    )


def sample_seeds(reader: StoreReader, flt: RunFilter, prompt_id: str) -> list[int]:
    cte, params = flt.runs_cte()
    frame = reader.frame(
        f"""WITH {cte} SELECT DISTINCT s.seed FROM r JOIN samples s USING (run_id)
            WHERE s.prompt_id = $p ORDER BY 1 LIMIT 100""",
        {**params, "p": prompt_id},
    )
    return [int(s) for s in frame["seed"]]


def samples_for(
    reader: StoreReader, flt: RunFilter, prompt_id: str, seed: int, variations: list[str]
) -> pl.DataFrame:
    cte, params = flt.runs_cte()
    return reader.frame(
        f"""
        WITH {cte}
        SELECT r.experiment_id AS experiment, r.variation_id AS variation, r.seed AS run_seed,
               s.prompt_id, s.prompt, s.seed, s.image_path, s.class_label, s.width, s.height,
               r.run_id
        FROM r JOIN samples s USING (run_id)
        WHERE s.prompt_id = $p AND s.seed = $s AND list_contains($v, r.variation_id)
        ORDER BY r.seed, r.variation_id LIMIT 400
        """,
        {**params, "p": prompt_id, "s": int(seed), "v": variations},
    )


def variations_with_samples(reader: StoreReader, flt: RunFilter) -> list[str]:
    cte, params = flt.runs_cte()
    frame = reader.frame(
        f"""WITH {cte} SELECT DISTINCT r.variation_id AS v FROM r
            WHERE EXISTS (SELECT 1 FROM samples s WHERE s.run_id = r.run_id) ORDER BY 1
            LIMIT 500""",
        params,
    )
    return frame["v"].to_list()


# -- contrasts and per-sample metrics ------------------------------------------------------


def contrasts(reader: StoreReader, experiments: tuple[str, ...]) -> pl.DataFrame:
    """The stored contrasts of ``experiments`` (all when empty), the latest of each id.

    Columns: ``experiment, contrast, kind, metric, candidate, baseline, target, estimate,
    ci_low, ci_high, confidence, n_samples`` (pairs), ``n_clusters`` (seeds), ``method,
    threshold, direction, verdict, details, code_version, computed_at``."""
    if not reader.has("contrasts"):
        return pl.DataFrame()
    where = "list_contains($e, experiment_id)" if experiments else "TRUE"
    return reader.frame(
        f"""
        SELECT experiment_id AS experiment, contrast_id AS contrast, kind, metric, candidate,
               baseline, target, estimate, ci_low, ci_high, confidence, n_samples, n_clusters,
               method, threshold, direction, verdict, CAST(details AS VARCHAR) AS details,
               code_version, computed_at
        FROM contrasts WHERE {where}
        QUALIFY row_number() OVER (PARTITION BY experiment_id, contrast_id
                                   ORDER BY computed_at DESC) = 1
        ORDER BY experiment, contrast
        """,
        {"e": list(experiments)} if experiments else None,
    )


def sample_metric_names(reader: StoreReader) -> list[str]:
    """The per-sample metrics stored (from ``sample_metric_definitions``: one row per run and
    metric, so this never scans the per-sample rows)."""
    if not reader.has("sample_metric_definitions"):
        return []
    names = reader.frame("SELECT DISTINCT metric FROM sample_metric_definitions")["metric"].to_list()
    order = {m: i for i, m in enumerate(SAMPLE_METRICS)}
    return sorted(names, key=lambda m: (order.get(m, len(order)), m))


def sample_metric_provenance(reader: StoreReader, metric: str) -> str:
    """What produced a per-sample metric: extractor, preprocessing (``'none'`` left out)."""
    frame = reader.frame(
        """SELECT DISTINCT feature_extractor, preprocessing FROM sample_metric_definitions
           WHERE metric = $m ORDER BY ALL LIMIT 5""", {"m": metric})
    parts = [", ".join(b for b in (fe not in (None, "none") and f"features: {fe}",
                                    pre not in (None, "none") and f"preprocessing: {pre}") if b)
             for fe, pre in frame.iter_rows()]
    return "; ".join(p for p in parts if p)


class SampleMetricSummary(NamedTuple):
    """A per-sample metric of one experiment, per variation (see :func:`sample_metric_summary`)."""

    by_variation: pl.DataFrame
    paired: pl.DataFrame | None  # variation − reference, when a reference was given


def sample_metric_summary(
    reader: StoreReader, flt: RunFilter, metric: str, experiment: str, reference: str | None = None
) -> SampleMetricSummary:
    """A per-sample metric of ``experiment``'s filtered variations, aggregated in DuckDB.

    ``by_variation``: one row per variation with its mean over all samples, a 95% normal
    interval, the range of the per-seed means (:func:`~fcr_results_explorer.stats.pool_seeds`),
    ``n_nonfinite`` (values left out, e.g. PSNR of identical images) and the parameters.

    ``paired`` (with ``reference``): per variation the mean paired difference ``variation −
    reference`` over the samples both have (same seed and sample index: the same x_T and
    prompt), with its interval and ``n`` pairs. The reference's rows are read whatever the run
    filter says (it may filter the reference out).

    One query: DuckDB reduces the millions of per-sample rows to one row per (run, seed) and
    kind (count, mean, variance); only those reach Python.

    Example:
        >>> s = sample_metric_summary(reader, RunFilter(), "cache_mse", "mini-exp-1", "fd-5-baseline")
        >>> s.by_variation.select("variation", "n", "mean", "ci95")
    """
    cte, params = flt.runs_cte()
    cols = ", ".join(f"re.{c}" for c in PARAM_COLUMNS)
    ok = "FILTER (WHERE isfinite(value))"
    # With a reference: one pass over the rows, each joined (LEFT) to its reference sample.
    if reference is None:
        source, pair_cols = "v", ""
    else:
        source = """v LEFT JOIN (
                 SELECT seed, sample_index, value AS ref_value FROM sample_metrics
                 WHERE metric = $metric AND isfinite(value)
                   AND run_id IN (SELECT run_id FROM runs WHERE experiment_id = $experiment
                                                            AND variation_id = $reference)) ref
               USING (seed, sample_index)"""
        pair = "FILTER (WHERE isfinite(value) AND ref_value IS NOT NULL)"
        pair_cols = f""",
                     count(*) {pair} AS d_n, avg(value - ref_value) {pair} AS d_mean,
                     var_samp(value - ref_value) {pair} AS d_var"""
    per_run = reader.frame(
        f"""
        WITH {cte}, re AS (SELECT * FROM r WHERE experiment_id = $experiment),
        v AS (SELECT run_id, seed, sample_index, value FROM sample_metrics
              WHERE metric = $metric AND run_id IN (SELECT run_id FROM re)),
        a AS (SELECT run_id, seed, count(value) {ok} AS n, avg(value) {ok} AS mean,
                     var_samp(value) {ok} AS var,
                     count(*) FILTER (WHERE value IS NULL OR NOT isfinite(value)) AS n_nonfinite{pair_cols}
              FROM {source} GROUP BY ALL)
        SELECT re.experiment_id AS experiment, re.variation_id AS variation, a.* EXCLUDE (run_id),
               {cols}
        FROM a JOIN re USING (run_id)
        ORDER BY variation, a.seed
        """,
        {**params, "experiment": experiment, "metric": metric,
         **({"reference": reference} if reference is not None else {})},
    )
    values = per_run.select(pl.exclude("^d_.*$"))
    by_variation = pool_seeds(values, PARAM_COLUMNS).with_columns(pl.lit(metric).alias("metric"))
    if reference is None:
        return SampleMetricSummary(by_variation, None)
    diff = per_run.filter(pl.col("variation") != reference).select(
        "experiment", "variation", "seed", pl.col("d_n").alias("n"), pl.col("d_mean").alias("mean"),
        pl.col("d_var").alias("var"))
    return SampleMetricSummary(by_variation, pool_seeds(diff))


def experiment_variations(reader: StoreReader, experiment: str) -> list[str]:
    """Every variation id of an experiment (whatever the filters), sorted."""
    return reader.frame("SELECT DISTINCT variation_id AS v FROM runs WHERE experiment_id = $e ORDER BY 1",
                        {"e": experiment})["v"].to_list()


def sample_metric_experiments(reader: StoreReader, flt: RunFilter) -> list[str]:
    """Experiments among the filtered runs that have per-sample metrics."""
    if not reader.has("sample_metric_definitions"):
        return []
    cte, params = flt.runs_cte()
    return reader.frame(
        f"""WITH {cte} SELECT DISTINCT r.experiment_id AS e FROM r
            WHERE r.run_id IN (SELECT run_id FROM sample_metric_definitions) ORDER BY 1""",
        params,
    )["e"].to_list()


# -- human study ----------------------------------------------------------------------------


def _hs(reader: StoreReader) -> str:
    return reader.human_study_schema or HUMAN_STUDY_ALIAS


def human_study_ids(reader: StoreReader) -> list[str]:
    return reader.frame(
        f"SELECT DISTINCT study_id FROM {_hs(reader)}.human_study_results ORDER BY 1"
    )["study_id"].to_list()


def human_study_results(reader: StoreReader, study_id: str) -> pl.DataFrame:
    return reader.frame(
        f"""
        SELECT variation_a, variation_b, n_a, n_b, n_tie, n_both_bad,
               win_rate_a, ci_low, ci_high, p_value, analysed_at
        FROM {_hs(reader)}.human_study_results WHERE study_id = $s
        QUALIFY analysed_at = max(analysed_at) OVER ()
        ORDER BY variation_a, variation_b
        """,
        {"s": study_id},
    )


def human_study_scores(reader: StoreReader, study_id: str) -> pl.DataFrame:
    schema = _hs(reader)
    table = "human_study_scores" if schema == "main" else f"{schema}.human_study_scores"
    if not reader.has(table):
        return pl.DataFrame()
    return reader.frame(
        f"""SELECT variation, bt_score, ci_low, ci_high
            FROM {schema}.human_study_scores WHERE study_id = $s
            ORDER BY bt_score DESC""",
        {"s": study_id},
    )


def human_study_summary(reader: StoreReader, study_id: str) -> dict[str, Any] | None:
    """The latest ``human_study_summary`` row of a study (votes, raters, agreement), if any."""
    schema = _hs(reader)
    if not reader.has("human_study_summary" if schema == "main" else f"{schema}.human_study_summary"):
        return None
    frame = reader.frame(
        f"""SELECT * EXCLUDE (details) FROM {schema}.human_study_summary WHERE study_id = $s
            ORDER BY analysed_at DESC LIMIT 1""",
        {"s": study_id},
    )
    return frame.to_dicts()[0] if frame.height else None
