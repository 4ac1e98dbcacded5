"""Samples: the same prompt and seed side by side across chosen variations."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from fcr_results_explorer import queries as q
from fcr_results_explorer import ui
from fcr_results_explorer.context import ViewContext

MAX_COLUMNS = 6


def resolve_image(folder: Path, relative: str) -> Path | None:
    """An image path from the store, relative to the store's folder; ``None`` if it escapes it
    or does not exist."""
    path = (folder / relative).resolve()
    try:
        path.relative_to(folder.resolve())
    except ValueError:
        return None
    return path if path.is_file() else None


def render(ctx: ViewContext) -> None:
    reader, flt, state = ctx.reader, ctx.run_filter, ctx.state
    if not reader.has("samples"):
        st.info("This store has no `samples` table.")
        return
    variations = q.variations_with_samples(reader, flt)
    if not variations:
        st.info("No samples stored for the filtered runs.")
        return
    chosen = state.multiselect(
        "Variations (side by side)", variations, key="vars",
        default=variations[:4], max_selections=MAX_COLUMNS,
    )
    c1, c2, c3 = st.columns([2, 3, 1])
    search = state.text_input("Search prompts", key="q", container=c1,
                              placeholder="text or prompt id")
    prompts = q.sample_prompts(reader, flt, search, variations=chosen or None)
    if prompts.is_empty():
        st.info("No prompt matches the search.")
        return
    labels = dict(zip(prompts["prompt_id"].to_list(), prompts["prompt"].to_list(), strict=False))
    prompt_id = state.selectbox(
        "Prompt", list(labels), key="prompt", container=c2,
        format_func=lambda p: f"{labels.get(p, p)}  [{p}]",
    )
    seeds = [str(s) for s in q.sample_seeds(reader, flt, prompt_id)]
    seed = state.selectbox("Sample seed", seeds, key="seed", container=c3)
    if not chosen or seed is None:
        st.info("Choose at least one variation.")
        return
    rows = q.samples_for(reader, flt, prompt_id, int(seed), chosen)
    st.markdown(f"**“{labels.get(prompt_id, prompt_id)}”** · prompt `{prompt_id}` · "
                f"sample seed {seed}")
    if rows.is_empty():
        st.info("The chosen variations have no sample for this prompt and seed.")
        return
    folder = reader.location.folder
    missing = 0
    for (run_seed,), group in rows.group_by("run_seed", maintain_order=True):
        by_var = {r["variation"]: r for r in group.to_dicts()}
        st.caption(f"run seed {run_seed}")
        cols = st.columns(len(chosen))
        for col, variation in zip(cols, chosen, strict=False):
            row = by_var.get(variation)
            with col:
                if row is None:
                    st.caption(f"{variation}: no sample")
                    continue
                path = resolve_image(folder, row["image_path"])
                if path is None:
                    missing += 1
                    st.warning(f"{variation}: image not found ({row['image_path']})")
                    continue
                st.image(str(path), caption=f"{variation} · {row['experiment']}",
                         width="stretch")
    if missing:
        st.caption(f"{missing} image file(s) missing under {folder}.")
    ui.download(rows, f"samples-{prompt_id}-seed{seed}", "samples")
