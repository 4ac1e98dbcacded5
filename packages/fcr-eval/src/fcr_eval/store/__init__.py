"""The DuckDB results store: one file of every run, its metrics, per-sample values, timings,
feature statistics and verdicts (the contract is ``docs/results-store.md``).

* :mod:`fcr_eval.store.db` — opening a file (lock back-off, clear errors) and transactions;
* :mod:`fcr_eval.store.migrations` — the numbered, frozen schema migrations;
* :mod:`fcr_eval.store.results` — :class:`ResultsStore`, the transactional writer and its typed
  readers, and the single-writer lock.

The typed rows it persists live below it, in :mod:`fcr_eval.records`, so the metrics and the
analysis produce them without importing DuckDB. ``from fcr_eval.store import ResultsStore,
RunRecord, ...`` is the public entry point and keeps working.
"""

from fcr_eval.store.results import *  # noqa: F401,F403
from fcr_eval.store.results import __all__  # noqa: F401
