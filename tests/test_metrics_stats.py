"""Evaluation math (FID / KID / IS) against independent oracles: scipy.linalg.sqrtm, closed forms, brute force."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from daguerre.metrics import feature_statistics, frechet_distance, inception_score, kernel_inception_distance

scipy_linalg = pytest.importorskip("scipy.linalg")


def _fd_scipy(mu1, s1, mu2, s2) -> float:
    """The reference FID formula (Heusel et al. code): trace of scipy's sqrtm of the non-symmetric product."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sqrtm warns on singular products
        covmean = scipy_linalg.sqrtm(s1 @ s2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


# ---------------------------------------------------------------- feature_statistics


def test_feature_statistics_matches_numpy_and_accepts_torch():
    x = np.random.default_rng(0).normal(size=(50, 7)).astype(np.float32)
    mu, sigma = feature_statistics(x)
    assert mu.dtype == np.float64 and sigma.dtype == np.float64
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-10, atol=1e-14)
    mu_t, sigma_t = feature_statistics(torch.from_numpy(x))
    np.testing.assert_allclose(mu_t, mu, rtol=1e-12)
    np.testing.assert_allclose(sigma_t, sigma, rtol=1e-12)


@pytest.mark.parametrize("bad", [np.zeros((1, 4)), np.zeros(5), np.array([[0.0, 1.0], [np.nan, 2.0]]),
                                 np.array([[0.0, np.inf], [1.0, 2.0]])])
def test_feature_statistics_rejects_bad_input(bad):
    with pytest.raises(ValueError):
        feature_statistics(bad)


# ---------------------------------------------------------------- frechet_distance


@pytest.mark.parametrize("n,d", [(500, 16), (200, 32), (20, 64)])  # last: rank-deficient covariances (N < D)
def test_frechet_distance_matches_scipy_sqrtm(n, d):
    rng = np.random.default_rng(n + d)
    a = rng.normal(size=(n, d))
    b = rng.normal(size=(n, d)) @ (np.eye(d) + 0.3 * rng.normal(size=(d, d)) / np.sqrt(d)) + 0.2
    mu1, s1 = feature_statistics(a)
    mu2, s2 = feature_statistics(b)
    fd = frechet_distance(mu1, s1, mu2, s2)
    ref = _fd_scipy(mu1, s1, mu2, s2)
    assert isinstance(fd, float)
    assert fd == pytest.approx(ref, rel=1e-6)


def test_frechet_distance_of_identical_statistics_is_zero():
    x = np.random.default_rng(1).normal(size=(300, 24))
    mu, s = feature_statistics(x)
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-9 * np.trace(s)
    mu, s = feature_statistics(x[:10])  # singular covariance too
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-9 * np.trace(s)


def test_frechet_distance_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(2)
    d = 12
    m1, m2 = rng.normal(size=d), rng.normal(size=d)
    v1, v2 = rng.uniform(0.1, 3.0, size=d), rng.uniform(0.1, 3.0, size=d)
    expected = float(np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2))
    assert frechet_distance(m1, np.diag(v1), m2, np.diag(v2)) == pytest.approx(expected, rel=1e-12)
    # invariant under a common rotation (the covariances are then no longer diagonal)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    rotated = frechet_distance(q @ m1, q @ np.diag(v1) @ q.T, q @ m2, q @ np.diag(v2) @ q.T)
    assert rotated == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_shape_errors_name_shapes():
    mu, s = np.zeros(3), np.eye(3)
    with pytest.raises(ValueError, match=r"\(4,\)"):
        frechet_distance(mu, s, np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match=r"\(3, 2\)"):
        frechet_distance(mu, np.zeros((3, 2)), mu, s)
    with pytest.raises(ValueError):
        frechet_distance(mu, s, mu, np.full((3, 3), np.nan))


# ---------------------------------------------------------------- kernel_inception_distance


def _mmd2_brute_force(x, y, degree=3, gamma=None, coef0=1.0) -> float:
    gamma = 1.0 / x.shape[1] if gamma is None else gamma

    def k(a, b):
        return (gamma * float(np.dot(a, b)) + coef0) ** degree

    m, n = len(x), len(y)
    kxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kyy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    kxy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return kxx + kyy - 2 * kxy


@pytest.mark.parametrize("degree,gamma,coef0", [(3, None, 1), (2, 0.5, 0.3)])
def test_kid_equals_brute_force_unbiased_mmd2(degree, gamma, coef0):
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(7, 4)), rng.normal(size=(7, 4)) + 0.5
    # one subset of the full size is a permutation of each set, and MMD^2_u is permutation invariant
    mean, std = kernel_inception_distance(x, y, subsets=1, subset_size=100, degree=degree, gamma=gamma,
                                          coef0=coef0)
    assert mean == pytest.approx(_mmd2_brute_force(x, y, degree, gamma, coef0), rel=1e-12)
    assert std == 0.0


def test_kid_subsets_use_seeded_draws_without_replacement():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(9, 3)), rng.normal(size=(12, 3)) + 0.3
    mean, std = kernel_inception_distance(x, y, subsets=5, subset_size=6, seed=11)
    draws = np.random.default_rng(11)
    vals = []
    for _ in range(5):
        xi = draws.choice(9, 6, replace=False)
        yi = draws.choice(12, 6, replace=False)
        vals.append(_mmd2_brute_force(x[xi], y[yi]))
    assert mean == pytest.approx(np.mean(vals), rel=1e-10)
    assert std == pytest.approx(np.std(vals), rel=1e-8)
    assert kernel_inception_distance(x, y, subsets=5, subset_size=6, seed=11) == (mean, std)


def test_kid_near_zero_for_same_distribution_and_positive_for_shifted():
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(600, 16)), rng.normal(size=(600, 16))
    same, same_std = kernel_inception_distance(a, b, subsets=20, subset_size=300)
    shifted, _ = kernel_inception_distance(a, b + 0.5, subsets=20, subset_size=300)
    assert abs(same) < 0.02
    assert shifted > 0.2
    assert shifted > 10 * (abs(same) + same_std)
    # torch inputs give the same numbers
    assert kernel_inception_distance(torch.from_numpy(a), torch.from_numpy(b), subsets=20, subset_size=300) == (
        pytest.approx(same, rel=1e-12), pytest.approx(same_std, rel=1e-12))


def test_kid_rejects_bad_input():
    x = np.zeros((5, 3))
    with pytest.raises(ValueError, match="dims"):
        kernel_inception_distance(x, np.zeros((5, 4)))
    with pytest.raises(ValueError):
        kernel_inception_distance(x, np.zeros((1, 3)))
    with pytest.raises(ValueError):
        kernel_inception_distance(x, x, subsets=0)
    with pytest.raises(ValueError):
        kernel_inception_distance(x, x, subset_size=1)


# ---------------------------------------------------------------- inception_score


@pytest.mark.parametrize("k", [2, 10, 37])
def test_inception_score_of_confident_uniform_predictions_is_k(k):
    probs = np.tile(np.eye(k), (5, 1))  # every contiguous split of k rows holds each class once
    mean, std = inception_score(probs, splits=5)
    assert mean == pytest.approx(k, rel=1e-12)
    assert std == pytest.approx(0.0, abs=1e-12)
    assert inception_score(probs, splits=1)[0] == pytest.approx(k, rel=1e-12)


def test_inception_score_of_identical_predictions_is_one():
    p = np.random.default_rng(6).dirichlet(np.ones(8))
    mean, std = inception_score(torch.from_numpy(np.tile(p, (40, 1))), splits=4)
    assert mean == pytest.approx(1.0, abs=1e-12)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_matches_direct_formula():
    probs = np.random.default_rng(7).dirichlet(np.full(5, 0.3), size=30)
    mean, _ = inception_score(probs, splits=1)
    py = probs.mean(0)
    expected = np.exp(np.mean(np.sum(probs * (np.log(probs) - np.log(py)), axis=1)))
    assert mean == pytest.approx(expected, rel=1e-12)
    assert 1.0 <= mean <= 5.0


@pytest.mark.parametrize("bad,splits", [(np.array([[0.5, 0.6], [0.5, 0.5]]), 1),
                                        (np.array([[1.5, -0.5], [0.5, 0.5]]), 1),
                                        (np.array([[np.nan, 1.0], [0.5, 0.5]]), 1),
                                        (np.array([0.5, 0.5]), 1),
                                        (np.eye(3), 4),
                                        (np.eye(3), 0)])
def test_inception_score_rejects_bad_input(bad, splits):
    with pytest.raises(ValueError):
        inception_score(bad, splits=splits)
