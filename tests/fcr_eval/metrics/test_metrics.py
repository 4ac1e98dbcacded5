"""Fréchet distance, KID, Inception Score and precision/recall against independent references."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from fcr_eval.metrics.frechet import (
    feature_statistics,
    frechet_distance,
    frechet_distance_from_features,
    frechet_distance_to_reference,
)
from fcr_eval.metrics.inception_score import inception_score
from fcr_eval.metrics.kid import kernel_distance, polynomial_mmd2_unbiased
from fcr_eval.metrics.precision_recall import precision_recall
from scipy import stats


@pytest.fixture
def feats():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(loc=0.3, size=(150, 6)) @ rng.normal(size=(6, 6))
    return a, b


def _fd_reference(mu1, s1, mu2, s2):
    # Tr((Σ1Σ2)^½) = Σ sqrt(λ_i(Σ1Σ2)); the eigenvalues of a product of SPD matrices are real ≥ 0.
    lam = np.linalg.eigvals(s1 @ s2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.abs(lam.real))))


def test_frechet_matches_eigenvalue_reference(feats):
    a, b = feats
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a.T), np.cov(b.T)
    ref = _fd_reference(mu1, s1, mu2, s2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-8)
    assert frechet_distance(mu1, s1, mu2, s2, method="sqrtm") == pytest.approx(ref, rel=1e-8)
    assert frechet_distance_from_features(a, b) == pytest.approx(ref, rel=1e-8)


def test_frechet_eigh_path_equals_scipy_sqrtm_path_and_stays_real_when_singular():
    """The default (two symmetric eigendecompositions) against clean-fid's scipy.linalg.sqrtm path,
    on covariances of fewer samples than dimensions (singular, as in a small mini-val)."""
    from scipy import linalg

    rng = np.random.default_rng(1)
    mix = rng.normal(size=(40, 40))
    a, b = rng.normal(size=(300, 40)) @ mix, rng.normal(loc=0.2, size=(30, 40)) @ mix
    (mu1, s1), (mu2, s2) = feature_statistics(a), feature_statistics(b)
    covmean = linalg.sqrtm(s1 @ s2)
    ref = float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-6)
    assert frechet_distance(mu1, s1, mu2, s2, method="sqrtm") == pytest.approx(ref, rel=1e-10)
    with pytest.raises(ValueError, match="method"):
        frechet_distance(mu1, s1, mu2, s2, method="svd")


@pytest.mark.parametrize("n_ref, n_gen", [(12, 300), (12, 8), (40, 40), (41, 30), (300, 30)])
def test_frechet_to_reference_equals_the_full_path_at_every_reference_size(n_ref, n_gen):
    """A reference of N <= D rows takes the N × N path (a mini-val against Inception's 2048 dimensions);
    N > D the D × D one: the same number as frechet_distance of the two fitted Gaussians and as clean-fid's
    sqrtm path, either side of N = D and with either side the singular one."""
    from scipy import linalg

    rng = np.random.default_rng(n_ref * 1000 + n_gen)
    mix = rng.normal(size=(40, 40))
    ref, gen = rng.normal(size=(n_ref, 40)) @ mix, rng.normal(loc=0.2, size=(n_gen, 40)) @ mix
    (mu1, s1), (mu2, s2) = feature_statistics(ref), feature_statistics(gen)
    sqrtm_path = float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
                       - 2 * np.trace(linalg.sqrtm(s1 @ s2)).real)
    value = frechet_distance_to_reference(ref, mu2, s2)
    assert value == pytest.approx(frechet_distance(mu1, s1, mu2, s2), rel=1e-7)
    assert value == pytest.approx(sqrtm_path, rel=1e-6)
    with pytest.raises(ValueError, match="means differ in shape"):
        frechet_distance_to_reference(ref[:, :30], mu2, s2)
    with pytest.raises(ValueError, match="does not match|do not match"):
        frechet_distance_to_reference(ref, mu2, s2[:30, :30])


def test_frechet_closed_form_for_diagonal_covariances():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    v1, v2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    expected = 1 + 0 + 4 + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(mu1, np.diag(v1), mu1, np.diag(v1)) == pytest.approx(0.0, abs=1e-8)


def test_feature_statistics_is_unbiased_mean_and_cov(feats):
    a, _ = feats
    mu, sigma = feature_statistics(a)
    np.testing.assert_allclose(mu, a.mean(0))
    np.testing.assert_allclose(sigma, (a - a.mean(0)).T @ (a - a.mean(0)) / (len(a) - 1))


def test_frechet_rejects_mismatched_inputs(feats):
    a, b = feats
    with pytest.raises(ValueError, match="feature dimensions differ"):
        frechet_distance_from_features(a, b[:, :5])
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance_from_features(np.full((3, 2), np.nan), b[:, :2])


def _mmd_reference(x, y):
    m, d = x.shape
    k = lambda u, v: (u @ v / d + 1) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_matches_loop_reference():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(12, 4)), rng.normal(loc=0.5, size=(12, 4))
    ref = _mmd_reference(x, y)
    assert polynomial_mmd2_unbiased(x, y) == pytest.approx(ref, rel=1e-10)
    # One subset that takes every row is a permutation of each set: MMD² is permutation-invariant.
    res = kernel_distance(x, y, num_subsets=1, max_subset_size=1000)
    assert res.value == pytest.approx(ref, rel=1e-10) and res.subset_size == 12


def test_kid_subsets_and_seed(feats):
    a, b = feats
    r1 = kernel_distance(a, b, num_subsets=20, max_subset_size=50, seed=3)
    r2 = kernel_distance(a, b, num_subsets=20, max_subset_size=50, seed=3)
    assert r1 == r2 and r1.subset_size == 50 and r1.std > 0
    same = kernel_distance(a, a + 1e-9, num_subsets=20, max_subset_size=50, seed=3)
    assert abs(same.value) < r1.value  # distinct distributions score higher than identical ones


def test_inception_score_reference():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(40, 7)) * 3
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    ref = np.exp(np.mean([stats.entropy(pi, p.mean(0)) for pi in p]))
    assert inception_score(logits, splits=1).mean == pytest.approx(ref, rel=1e-9)
    assert inception_score(np.zeros((10, 5)), splits=2).mean == pytest.approx(1.0)
    assert inception_score(np.eye(10) * 100, splits=1).mean == pytest.approx(10.0, rel=1e-6)


def _pr_reference(real, fake, k):
    def radii(x):
        d = np.linalg.norm(x[:, None] - x[None], axis=-1)
        return np.sort(d, axis=1)[:, k]
    rr, rf = radii(real), radii(fake)
    d = np.linalg.norm(fake[:, None] - real[None], axis=-1)
    precision = np.mean((d <= rr[None]).any(1))
    recall = np.mean((d.T <= rf[None]).any(1))
    return precision, recall


def test_precision_recall_matches_brute_force(feats):
    a, b = feats
    pr = precision_recall(a, b, k=3, batch_size=64)
    ref = _pr_reference(a, b, 3)
    assert (pr.precision, pr.recall) == pytest.approx(ref)
    assert 0 < pr.precision < 1 and 0 < pr.recall < 1
    same = precision_recall(a, a, k=3)
    assert same.precision == 1.0 and same.recall == 1.0
    far = precision_recall(a, a + 1e3, k=3)
    assert far.precision == 0.0 and far.recall == 0.0
