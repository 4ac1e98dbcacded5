"""The experiment spec: the schema of ``experiments/*.toml``, its loading and validation
(``file:line`` errors), and the vocabularies an experiment file may use. Imports no torch and no
DuckDB (checked by the import contract).

* :mod:`fcr_eval.spec.experiment` — :func:`load_experiment` and :class:`Experiment` (the loader:
  profiles, the order of the checks, the checks that span tables); it re-exports every table;
* one module per table, each dataclass beside its check — :mod:`~fcr_eval.spec.models`,
  :mod:`~fcr_eval.spec.datasets`, :mod:`~fcr_eval.spec.sampling`, :mod:`~fcr_eval.spec.finetune`,
  :mod:`~fcr_eval.spec.evaluation`, :mod:`~fcr_eval.spec.robustness`,
  :mod:`~fcr_eval.spec.variations` (expansion and each variation's resolved settings),
  :mod:`~fcr_eval.spec.human_study`, :mod:`~fcr_eval.spec.contrasts` (``[[contrasts]]``) and
  :mod:`~fcr_eval.spec.criteria` (``[criteria]``);
* :mod:`fcr_eval.spec.checker` — the generic checker: types, finite numbers, nested tables,
  unknown keys with a close match, ``file:line`` (in the profile's table when a profile sets a key);
* :mod:`fcr_eval.spec.vocabulary` — every word a file may use: sampler kinds, schedulers,
  robustness protocols, metric requests, extractors, data-set kinds and roles, directions,
  per-sample metric names, replications;
* :mod:`fcr_eval.spec.names` — the one rule for ids and :func:`~fcr_eval.spec.names.safe_child`, the
  check that a path built from ids stays under its folder (plan, run and report use it).
"""
