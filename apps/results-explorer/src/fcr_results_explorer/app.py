"""The Streamlit script: ``streamlit run app.py`` (``fcr-explorer`` does this for you).

The store path comes from the ``FCR_EXPLORER_DB`` environment variable (set by ``fcr-explorer
--db``), the human-study store from ``FCR_EXPLORER_HUMAN_STUDY``. The view and every filter live
in the URL query, e.g. ``?view=compare&experiment_id=exp-1&metrics=fd_efficientnet_lite0``.
"""

from __future__ import annotations

import os

import duckdb
import streamlit as st
from fcr_eval.store.db import describe_database

from fcr_results_explorer import queries as q
from fcr_results_explorer.app_env import ENV_DB, ENV_HUMAN_STUDY
from fcr_results_explorer.context import ViewContext
from fcr_results_explorer.page_state import PageState
from fcr_results_explorer.reader import STORE_TABLES, StoreLocation, StoreReader, StoreUnavailable
from fcr_results_explorer.views import (
    comparison,
    criteria,
    human_study,
    mechanism,
    overview,
    paired,
    quality_speed,
    samples,
)

VIEWS = {
    "overview": ("Overview", overview.render),
    "compare": ("Comparison and contrasts", comparison.render),
    "paired": ("Paired per-sample metrics", paired.render),
    "quality-speed": ("Quality vs speed", quality_speed.render),
    "mechanism": ("Mechanism (σ²_Δ)", mechanism.render),
    "criteria": ("Success criteria", criteria.render),
    "samples": ("Samples", samples.render),
    "human-study": ("Human study", human_study.render),
}


def _guidance_missing(location: StoreLocation) -> None:
    st.info(
        f"""
**No results store at `{location.path}` yet.**

The experiment runner (fcr-eval) creates it when the first run of an experiment finishes, e.g.

```
uv run fcr-eval run experiments/<experiment>.toml
```

or point the explorer at an existing store: `uv run fcr-explorer --db path/to/fcr.duckdb`.
This page shows the results as soon as the store exists; refresh it then.
"""
    )


def _guidance_empty(location: StoreLocation, missing: list[str]) -> None:
    detail = (f" (tables not created yet: {', '.join(missing)})" if missing else "")
    st.info(
        f"""
**The store at `{location.path}` has no finished runs yet**{detail}.

Runs appear here as the experiment runner finishes them (each run is written in one
transaction, so a run is either shown whole or not at all). Refresh the page to see new runs.
"""
    )


def _sidebar_filters(reader: StoreReader, state: PageState) -> q.RunFilter:
    options = q.filter_options(reader)
    sb = st.sidebar
    sb.markdown("#### Filters")
    chosen: dict[str, tuple[str, ...]] = {}
    for col, label in q.FILTER_COLUMNS:
        values = options.get(col, [])
        if len(values) <= 1 and col != "experiment_id":
            continue  # nothing to choose between: keep the sidebar short
        picked = state.multiselect(label, values, key=col, container=sb, placeholder="all")
        if picked:
            chosen[col] = tuple(picked)
    flt = q.RunFilter(chosen)
    if chosen:
        sb.caption(f"{q.count_runs(reader, flt)} runs match the filters.")
    return flt


def main() -> None:
    st.set_page_config(page_title="FCR results explorer", page_icon="📊", layout="wide")
    location = StoreLocation.resolve(os.environ.get(ENV_DB), os.environ.get(ENV_HUMAN_STUDY))
    state = PageState()

    st.sidebar.title("FCR results")
    st.sidebar.caption(f"Store: `{location.path}`")
    view = state.radio(
        "View", list(VIEWS), key="view", default="overview", container=st.sidebar,
        format_func=lambda v: VIEWS[v][0],
    )
    title, render = VIEWS[view]
    st.title(title)

    reader = StoreReader(location)
    try:
        if not reader.exists():
            _guidance_missing(location)
            return
        try:
            tables = reader.tables()
        except (duckdb.Error, StoreUnavailable) as error:
            st.error(f"Could not open the store at `{location.path}` read-only: {error}")
            return
        kind, names = reader.kind()
        if kind not in ("results store", "empty"):
            st.error(f"`{location.path}` is not a results store: it is {describe_database(kind, names)}. The "
                     "explorer reads it as it is and shows nothing from it; point `fcr-explorer --db` at the "
                     "results store (e.g. results/fcr.duckdb)"
                     + (", and a study file at `--human-study`." if kind == "human-study file" else "."))
            return
        missing = [t for t in STORE_TABLES if t not in tables]
        if "runs" not in tables or q.count_runs(reader, q.RunFilter()) == 0:
            _guidance_empty(location, missing)
            return
        if reader.note.is_snapshot:
            pid = reader.note.lock_holder_pid
            st.warning(
                f"A running experiment{f' (PID {pid})' if pid else ''} holds the store's write "
                f"lock, so this page reads a snapshot taken at "
                f"{reader.note.taken_at:%H:%M:%S} UTC. Runs finished since then appear when you "
                "refresh.",
                icon="⏳",
            )
        demo = reader.frame(
            "SELECT count(*) AS n FROM runs WHERE json_extract_string(params, '$.demo') = 'true'"
        )["n"][0]
        if demo:
            st.sidebar.warning(f"{demo} runs in this store are demo runs with made-up numbers "
                               "(`apps/results-explorer/scripts/demo_store.py`).",
                               icon=":material/science:")
        flt = _sidebar_filters(reader, state)
        ctx = ViewContext(reader, flt, state, q.metric_catalogue(reader))
        render(ctx)
    finally:
        reader.close()  # never keep a writer from opening the store
        state.sync_url()


main()
