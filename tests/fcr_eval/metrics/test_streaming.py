"""Set-level metrics from a feature set that is read chunk by chunk (a run's memory-mapped spill)
equal the whole-array versions: Fréchet statistics to float rounding, KID / precision / recall /
IS exactly; the chunked k-NN equals the brute-force one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fcr_eval.metrics import inception_score as is_mod
from fcr_eval.metrics.frechet import feature_statistics, frechet_distance, streamed_statistics
from fcr_eval.metrics.inception_score import inception_score
from fcr_eval.metrics.kid import kernel_distance
from fcr_eval.metrics.precision_recall import knn_radii, precision_recall
from fcr_eval.metrics.streaming import FeatureSpill, RunningMoments
from scipy.special import log_softmax


def _features(n, d, seed, loc=3.0):
    rng = np.random.default_rng(seed)
    return rng.normal(loc, 1.0, (n, d)) * rng.uniform(0.5, 2.0, d)


def _spill(tmp_path, x, order=None, name="f.npy"):
    spill = FeatureSpill(tmp_path / name, len(x), x.shape[1])
    starts = list(range(0, len(x), 7))
    for a in (order(starts) if order else starts):
        spill.write_rows(a, x[a: a + 7])
    return spill.open()


def test_running_moments_equal_mean_and_cov_to_rounding():
    x = _features(501, 12, 0, loc=50.0)  # a large mean: the naive Σxxᵀ − nμμᵀ would lose digits
    m = RunningMoments(12)
    for chunk in np.array_split(x, [1, 2, 40, 41, 300]):
        m.update(chunk)
    mu, sigma = m.statistics()
    assert np.abs(mu - x.mean(0)).max() < 1e-12 * 50
    assert np.abs(sigma - np.cov(x, rowvar=False)).max() < 1e-10


def test_streamed_frechet_distance_equals_the_whole_array_one(tmp_path):
    real, fake = _features(300, 16, 1), _features(260, 16, 2, loc=3.2)
    spilled = _spill(tmp_path, fake, order=lambda s: s[::-1])  # rows written out of order
    assert isinstance(spilled, np.memmap)
    whole = frechet_distance(*feature_statistics(real), *feature_statistics(fake))
    streamed = frechet_distance(*feature_statistics(real), *streamed_statistics(spilled))
    assert streamed == pytest.approx(whole, rel=1e-10)
    assert whole > 0.1  # the sets differ: the comparison is not of two zeros


def test_kid_on_a_memory_mapped_spill_is_the_same_number(tmp_path):
    real, fake = _features(120, 8, 3), _features(90, 8, 4)
    spilled = _spill(tmp_path, fake)
    a = kernel_distance(real, fake, num_subsets=20, max_subset_size=50, seed=7)
    b = kernel_distance(real, spilled, num_subsets=20, max_subset_size=50, seed=7)
    assert a == b and a.value != 0


def _brute_radii(x, k):
    d = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    return np.sort(d, axis=1)[:, k]


@pytest.mark.parametrize("batch", [1, 5, 7, 64, 10_000])
def test_chunked_knn_equals_brute_force(batch):
    x = _features(61, 5, 5)
    x[10] = x[11]  # a duplicate row: distance 0 to another row, not only to itself
    got = knn_radii(x, k=3, batch_size=batch).numpy()
    assert np.allclose(got, _brute_radii(x, 3), rtol=1e-12, atol=1e-12)
    assert np.array_equal(got, knn_radii(x, k=3, batch_size=10_000).numpy())


def test_precision_recall_chunked_equals_brute_force(tmp_path):
    real, fake = _features(80, 6, 6), _features(70, 6, 7, loc=3.5)
    rr, rf = _brute_radii(real, 3), _brute_radii(fake, 3)
    d = np.sqrt(((fake[:, None, :] - real[None, :, :]) ** 2).sum(-1))  # (fake, real)
    precision = (d <= rr[None, :]).any(1).mean()
    recall = (d.T <= rf[None, :]).any(1).mean()
    pr = precision_recall(real, _spill(tmp_path, fake), k=3, batch_size=9)
    assert pr.precision == pytest.approx(precision, abs=1e-7) and pr.recall == pytest.approx(recall, abs=1e-7)
    assert 0 < pr.precision < 1 and 0 < pr.recall < 1
    assert pr == precision_recall(torch.from_numpy(real), torch.from_numpy(fake), k=3, batch_size=4096)


def test_inception_score_read_in_chunks_equals_the_whole_array(tmp_path, monkeypatch):
    logits = np.random.default_rng(8).normal(0, 3, (103, 10))
    lp = log_softmax(logits, axis=1)
    scores = []
    for lo, hi in zip(np.linspace(0, 103, 4).astype(int)[:-1], np.linspace(0, 103, 4).astype(int)[1:], strict=True):
        p = np.exp(lp[lo:hi])
        scores.append(np.exp((p * (lp[lo:hi] - np.log(p.mean(0) + 1e-30))).sum(1).mean()))
    monkeypatch.setattr(is_mod, "CHUNK_ROWS", 8)
    got = inception_score(_spill(tmp_path, logits), splits=3)
    assert got.mean == pytest.approx(np.mean(scores), rel=1e-12) and got.std == pytest.approx(np.std(scores), rel=1e-9)


def test_spill_refuses_rows_that_do_not_fit(tmp_path):
    spill = FeatureSpill(tmp_path / "f.npy", 4, 3)
    with pytest.raises(ValueError, match="do not fit a spill of 4 × 3"):
        spill.write_rows(2, np.zeros((3, 3)))


def test_a_set_in_one_chunk_keeps_np_cov_bit_for_bit():
    x = _features(50, 9, 9)
    mu, sigma = RunningMoments.of(x).statistics()
    assert np.array_equal(mu, x.mean(axis=0)) and np.array_equal(sigma, np.cov(x, rowvar=False))
