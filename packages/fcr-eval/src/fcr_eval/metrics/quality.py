"""Quality metrics of a generated set against a reference set, as store-ready records.

:func:`quality_metrics` turns two :class:`~fcr_eval.metrics.extractors.ExtractedFeatures` into
``MetricRecord`` rows — Fréchet distance, KID, Inception Score (when the extractor has logits),
improved precision and recall — each carrying its extractor, preprocessing, sample count and
the settings in ``details``. Reference features are computed once per extractor/preprocessing and
cached with :func:`save_features` / :func:`load_features`, which refuse a cache made by a
different extractor or preprocessing.

Example:
    >>> ext = EfficientNetLite0Extractor()
    >>> real = load_features("results/ref/fmnist_test.npz", ext) or ext.extract(real_images)
    >>> records = quality_metrics(real, ext.extract(samples), reference="fashion-mnist-test")
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from fcr_eval.metrics.extractors import ExtractedFeatures, FeatureExtractor, metric_name
from fcr_eval.metrics.frechet import (
    fd_estimable,
    frechet_distance_to_reference,
    streamed_statistics,
)
from fcr_eval.metrics.inception_score import inception_score
from fcr_eval.metrics.kid import kernel_distance
from fcr_eval.metrics.precision_recall import precision_recall
from fcr_eval.records import MetricRecord

__all__ = ["quality_metrics", "save_features", "load_features"]

logger = logging.getLogger(__name__)


def quality_metrics(real: ExtractedFeatures, fake: ExtractedFeatures, *, reference: str = "",
                    kid_subsets: int = 100, kid_subset_size: int = 1000, pr_k: int = 3, is_splits: int = 10,
                    seed: int = 0, include: tuple[str, ...] = ("fd", "kid", "is", "precision_recall")
                    ) -> list[MetricRecord]:
    """Fréchet distance, KID, IS, precision and recall of ``fake`` against ``real``.

    Args:
        real / fake: features from the *same* extractor and preprocessing. ``fake``'s arrays may be
            memory-mapped (a run's spill): every metric reads them chunk by chunk or gathers rows,
            so memory does not grow with the generated set's size.
        reference: name of the reference set, stored in ``details``.
        include: which metrics to compute.

    Example:
        >>> [r.metric for r in quality_metrics(real, fake)]
        ['fd_efficientnet_lite0', 'kid_efficientnet_lite0', 'is_efficientnet_lite0', 'precision', 'recall']
    """
    if (real.name, real.preprocessing) != (fake.name, fake.preprocessing):
        raise ValueError(
            f"real features come from {real.name}/{real.preprocessing} but generated ones from "
            f"{fake.name}/{fake.preprocessing}; extract both with the same extractor")
    ext, prep, n = fake.name, fake.preprocessing, fake.n
    base = {"reference": reference, "n_reference": real.n}
    out: list[MetricRecord] = []
    if "fd" in include:
        dim = int(fake.features.shape[1])
        if real.features.shape[1] != dim:
            raise ValueError(f"feature dimensions differ: {real.features.shape[1]} vs {dim}")
        fd = frechet_distance_to_reference(real.features, *streamed_statistics(fake.features))
        out.append(MetricRecord(metric_name("fd", ext), fd, ext, prep, n, {**base, "feature_dim": dim,
                                               "estimable": fd_estimable(min(n, real.n), dim)}))
    if "kid" in include:
        k = kernel_distance(real.features, fake.features, num_subsets=kid_subsets, max_subset_size=kid_subset_size,
                            seed=seed)
        out.append(MetricRecord(metric_name("kid", ext), k.value, ext, prep, n,
                                {**base, "std": k.std, "num_subsets": k.num_subsets, "subset_size": k.subset_size,
                                 "seed": seed}))
    if "is" in include and fake.logits is not None:
        splits = max(1, min(is_splits, n))
        s = inception_score(fake.logits, splits=splits)
        out.append(MetricRecord(metric_name("is", ext), s.mean, ext, prep, n, {"std": s.std, "splits": splits}))
    if "precision_recall" in include:
        pr = precision_recall(real.features, fake.features, k=pr_k)
        details = {**base, "k": pr_k}
        out.append(MetricRecord("precision", pr.precision, ext, prep, n, dict(details)))
        out.append(MetricRecord("recall", pr.recall, ext, prep, n, dict(details)))
    return out


def save_features(path: str | Path, feats: ExtractedFeatures, **info) -> None:
    """Save features with their extractor name and preprocessing (``.npz``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = json.dumps({"name": feats.name, "preprocessing": feats.preprocessing, **info}, default=str)
    arrays = {"features": feats.features, "meta": np.array(meta)}
    if feats.logits is not None:
        arrays["logits"] = feats.logits
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)  # atomic: a crash never leaves a half-written cache


def load_features(path: str | Path, extractor: FeatureExtractor | None = None) -> ExtractedFeatures | None:
    """Load cached features; ``None`` if the file is missing or was made by another extractor or
    preprocessing than ``extractor`` (then recompute)."""
    path = Path(path)
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        feats = ExtractedFeatures(z["features"], z["logits"] if "logits" in z else None, meta["name"],
                                  meta["preprocessing"])
    if extractor is not None and (feats.name, feats.preprocessing) != (extractor.name, extractor.preprocessing):
        logger.info("feature cache %s was made by %s/%s, not %s/%s; ignoring it", path, feats.name,
                    feats.preprocessing, extractor.name, extractor.preprocessing)
        return None
    return feats
