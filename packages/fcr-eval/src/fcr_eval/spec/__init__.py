"""The experiment spec: the schema of ``experiments/*.toml``, its loading and validation
(``file:line`` errors), and the vocabularies an experiment file may use. Imports no torch and no
DuckDB (checked by the import contract).

* :mod:`fcr_eval.spec.experiment` — :func:`load_experiment`, :class:`Experiment` and its tables;
* :mod:`fcr_eval.spec.vocabulary` — sampler kinds, schedulers, robustness protocols, directions,
  per-sample metric names;
* :mod:`fcr_eval.spec.contrasts`, :mod:`fcr_eval.spec.criteria` — ``[[contrasts]]`` and ``[criteria]``.
* :mod:`fcr_eval.spec.names` — the one rule for ids and :func:`~fcr_eval.spec.names.safe_child`, the
  check that a path built from ids stays under its folder (plan, run and report use it).
"""
