"""Store-ready quality records and the feature cache."""

from __future__ import annotations

import numpy as np
import pytest
from fcr_eval.metrics.extractors import ExtractedFeatures
from fcr_eval.metrics.frechet import frechet_distance_from_features
from fcr_eval.metrics.quality import load_features, quality_metrics, save_features


def _feats(seed, shift=0.0, name="efficientnet_lite0", prep="p224", logits=True):
    rng = np.random.default_rng(seed)
    f = rng.normal(loc=shift, size=(60, 8))
    return ExtractedFeatures(f, rng.normal(size=(60, 5)) if logits else None, name, prep)


def test_records_carry_provenance_and_values():
    real, fake = _feats(0), _feats(1, 0.5)
    recs = {r.metric: r for r in quality_metrics(real, fake, reference="ref", kid_subsets=5, kid_subset_size=30)}
    assert set(recs) == {"fd_efficientnet_lite0", "kid_efficientnet_lite0", "is_efficientnet_lite0", "precision", "recall"}
    assert recs["fd_efficientnet_lite0"].value == pytest.approx(frechet_distance_from_features(real.features, fake.features))
    for r in recs.values():
        assert (r.feature_extractor, r.preprocessing, r.n_samples) == ("efficientnet_lite0", "p224", 60)
    assert recs["kid_efficientnet_lite0"].details["subset_size"] == 30
    assert recs["precision"].details == {"reference": "ref", "n_reference": 60, "k": 3}


def _sized(n, d, seed):
    rng = np.random.default_rng(seed)
    return ExtractedFeatures(rng.normal(size=(n, d)), None, "efficientnet_lite0", "p")


@pytest.mark.parametrize(("n_fake", "n_real", "dim", "estimable"),
                         [(40, 200, 16, True), (16, 200, 16, False), (200, 12, 16, False)])
def test_fd_record_stores_whether_it_is_estimable(n_fake, n_real, dim, estimable):
    """FD from no more samples (of either set) than feature dimensions is flagged with the record,
    the one place the rule is applied; reports and verdicts read the flag."""
    (fd,) = quality_metrics(_sized(n_real, dim, 0), _sized(n_fake, dim, 1), include=("fd",))
    assert fd.details["estimable"] is estimable and fd.details["feature_dim"] == dim


def test_mismatched_extractors_are_refused():
    with pytest.raises(ValueError, match="same extractor"):
        quality_metrics(_feats(0), _feats(1, prep="p96"))


def test_feature_cache_roundtrip_and_mismatch(tmp_path):
    class Ext:
        name, preprocessing = "efficientnet_lite0", "p224"

    f = _feats(0)
    save_features(tmp_path / "ref.npz", f, reference="fmnist-test")
    got = load_features(tmp_path / "ref.npz", Ext())
    np.testing.assert_array_equal(got.features, f.features)
    np.testing.assert_array_equal(got.logits, f.logits)
    Ext.preprocessing = "p96"
    assert load_features(tmp_path / "ref.npz", Ext()) is None
    assert load_features(tmp_path / "missing.npz") is None
