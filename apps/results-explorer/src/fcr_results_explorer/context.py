"""What every view gets: the open store, the run filter and the page state."""

from __future__ import annotations

from dataclasses import dataclass

from fcr_results_explorer.page_state import PageState
from fcr_results_explorer.queries import RunFilter
from fcr_results_explorer.reader import StoreReader


@dataclass
class ViewContext:
    reader: StoreReader
    run_filter: RunFilter
    state: PageState
    metrics: list[str]  # metric_catalogue(reader)

    @property
    def experiments(self) -> tuple[str, ...]:
        return self.run_filter.values.get("experiment_id", ())
