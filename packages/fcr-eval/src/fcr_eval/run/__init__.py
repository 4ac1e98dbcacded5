"""Running a plan: the runner's orchestration (:mod:`~fcr_eval.run.runner`), the model families
(:mod:`~fcr_eval.run.contexts`: embedded default, Stable Diffusion), sampling and timing
(:mod:`~fcr_eval.run.sampling`, :mod:`~fcr_eval.run.schedulers`), per-image evaluation
(:mod:`~fcr_eval.run.evaluation`), fine-tuning (:mod:`~fcr_eval.run.finetuning`,
:mod:`~fcr_eval.run.early_stopping`) and multi-process sharding (:mod:`~fcr_eval.run.distributed`).
"""
