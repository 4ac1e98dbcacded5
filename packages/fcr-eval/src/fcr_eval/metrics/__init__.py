"""Metrics: pure maths and feature extraction, no store and no runner (checked by the import
contract). Each number they return says what produced it (extractor, preprocessing, sample count).

* :mod:`~fcr_eval.metrics.extractors` (EfficientNet-Lite0, clean-fid Inception),
  :mod:`~fcr_eval.metrics.frechet`, :mod:`~fcr_eval.metrics.kid`,
  :mod:`~fcr_eval.metrics.inception_score`, :mod:`~fcr_eval.metrics.precision_recall`,
  :mod:`~fcr_eval.metrics.quality` (their records);
* :mod:`~fcr_eval.metrics.paired` (cache error against the uncached twin),
  :mod:`~fcr_eval.metrics.class_agreement`, :mod:`~fcr_eval.metrics.clip_score`;
* :mod:`~fcr_eval.metrics.cost` (time, FLOPs, memory), :mod:`~fcr_eval.metrics.mechanism` (σ²_Δ),
  :mod:`~fcr_eval.metrics.robustness` (the exp-2 perturbations).
"""
