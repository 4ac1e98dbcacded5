"""Statistics on stored values, from frames and arrays (no store, no runner: the import contract
checks it): intervals and tests (:mod:`~fcr_eval.analysis.stats`), paired contrasts
(:mod:`~fcr_eval.analysis.contrasts`), the design's success criteria
(:mod:`~fcr_eval.analysis.criteria`) and the one PASS / FAIL / INCONCLUSIVE rule
(:mod:`~fcr_eval.analysis.verdicts`).
"""
