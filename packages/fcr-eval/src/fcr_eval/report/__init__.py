"""Reporting a stored experiment: tables (:mod:`~fcr_eval.report.report`), the success-criteria
board (:mod:`~fcr_eval.report.board`) and plots (:mod:`~fcr_eval.report.plots`). Reads the store,
computes with :mod:`fcr_eval.analysis`, never samples.
"""
