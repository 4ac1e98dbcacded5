"""Page state (view, filters, choices) that lives in the URL query so a view can be shared.

Streamlit drops a widget's value from ``st.session_state`` when the widget is not drawn in a
run (switching views hides the previous view's widgets). ``PageState`` keeps its own copy, seeded
once per session from ``st.query_params``, re-seeds widgets from it, and writes the non-default
values back to the URL at the end of every run.

Every value is text (query parameters are text); a multi-select is a list of text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import streamlit as st

_STATE = "_fcr_page_state"
_DEFAULTS = "_fcr_page_defaults"


class PageState:
    """Widgets bound to URL query parameters."""

    def __init__(self) -> None:
        ss = st.session_state
        if _STATE not in ss:
            ss[_STATE] = {
                key: (st.query_params.get_all(key) if len(st.query_params.get_all(key)) > 1
                      else st.query_params[key])
                for key in st.query_params
            }
        self.values: dict[str, Any] = ss[_STATE]
        self.defaults: dict[str, Any] = {}
        ss[_DEFAULTS] = self.defaults

    # -- widgets ------------------------------------------------------------------------------
    def _seed(self, key: str, value: Any) -> None:
        st.session_state[key] = value

    def multiselect(
        self,
        label: str,
        options: Sequence[str],
        key: str,
        default: Sequence[str] = (),
        container: Any = None,
        **kwargs: Any,
    ) -> list[str]:
        container = container or st
        options = list(options)
        self.defaults[key] = list(default)
        stored = st.session_state.get(key, self.values.get(key, list(default)))
        if isinstance(stored, str):
            stored = [stored] if stored else []
        self._seed(key, [v for v in stored if v in options])
        value = container.multiselect(label, options, key=key, **kwargs)
        self.values[key] = list(value)
        return list(value)

    def selectbox(
        self,
        label: str,
        options: Sequence[str],
        key: str,
        default: str | None = None,
        container: Any = None,
        format_func: Callable[[Any], str] = str,
        widget: str = "selectbox",
        **kwargs: Any,
    ) -> str | None:
        container = container or st
        options = list(options)
        if not options:
            return None
        fallback = default if default in options else options[0]
        self.defaults[key] = fallback
        stored = st.session_state.get(key, self.values.get(key, fallback))
        self._seed(key, stored if stored in options else fallback)
        draw = getattr(container, widget)
        value = draw(label, options, key=key, format_func=format_func, **kwargs)
        self.values[key] = value
        return value

    def radio(self, *args: Any, **kwargs: Any) -> str | None:
        return self.selectbox(*args, widget="radio", **kwargs)

    def checkbox(
        self, label: str, key: str, default: bool = False, container: Any = None, **kwargs: Any
    ) -> bool:
        container = container or st
        self.defaults[key] = "1" if default else "0"
        stored = st.session_state.get(key, self.values.get(key, self.defaults[key]))
        if isinstance(stored, str):
            stored = stored == "1"
        self._seed(key, bool(stored))
        value = container.checkbox(label, key=key, **kwargs)
        self.values[key] = "1" if value else "0"
        return bool(value)

    def text_input(
        self, label: str, key: str, default: str = "", container: Any = None, **kwargs: Any
    ) -> str:
        container = container or st
        self.defaults[key] = default
        stored = st.session_state.get(key, self.values.get(key, default))
        self._seed(key, str(stored))
        value = container.text_input(label, key=key, **kwargs)
        self.values[key] = value
        return value

    # -- URL ----------------------------------------------------------------------------------
    def sync_url(self) -> None:
        """Write the values that differ from their defaults into the URL query."""
        wanted: dict[str, Any] = {}
        for key, value in self.values.items():
            if key in self.defaults and value == self.defaults[key]:
                continue
            if key not in self.defaults:
                continue  # a widget of another view: keep it in state, not in this URL
            if isinstance(value, list):
                wanted[key] = [str(v) for v in value]
            elif value is not None:
                wanted[key] = str(value)
        current: dict[str, Any] = {}
        for key in st.query_params:
            vals = st.query_params.get_all(key)
            current[key] = vals if len(vals) != 1 else vals[0]
        normalised = {k: (v[0] if isinstance(v, list) and len(v) == 1 else v)
                      for k, v in wanted.items()}
        if normalised != current:
            st.query_params.from_dict(wanted)
