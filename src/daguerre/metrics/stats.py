"""Evaluation statistics for generated images: FID, KID and Inception Score, computed from features.

Everything here is pure numpy math on already-extracted features (or class probabilities), in float64.
The feature extractor (an Inception network or any other) lives elsewhere; these functions only see arrays.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["feature_statistics", "frechet_distance", "kernel_inception_distance", "inception_score"]


def _as_float64(x: Any, name: str) -> np.ndarray:
    """Convert a numpy array / torch tensor / array-like to a float64 numpy array (torch only if given one)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor, without importing torch here
        x = x.detach().cpu().double().numpy()
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: cannot convert to a float64 array ({e})") from e
    return arr


def _as_features(x: Any, name: str, min_rows: int = 2) -> np.ndarray:
    arr = _as_float64(x, name)
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D (N, D) array of features, got shape {arr.shape}")
    if arr.shape[0] < min_rows:
        raise ValueError(f"{name}: need at least {min_rows} samples, got N={arr.shape[0]}")
    if arr.shape[1] < 1:
        raise ValueError(f"{name}: feature dimension must be >= 1, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: contains non-finite values (NaN or inf)")
    return arr


def feature_statistics(features: Any) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance of a set of features, the Gaussian fit used by FID.

    Heusel et al. 2017 ("GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium",
    Sec. 3) model the Inception features of a set of images as a Gaussian N(mu, Sigma); as in the reference
    FID code, ``mu`` is the sample mean and ``sigma`` the unbiased sample covariance
    (``np.cov(features, rowvar=False)``, divisor N - 1), both float64. ``features`` is an (N, D) numpy
    array or torch tensor with N >= 2 and only finite values, else ValueError.
    """
    x = _as_features(features, "features")
    mu = x.mean(axis=0)
    centred = x - mu
    sigma = centred.T @ centred / (x.shape[0] - 1)
    return mu, sigma


def _clip_eigenvalues(w: np.ndarray) -> np.ndarray:
    """Zero the eigenvalues of a symmetric PSD matrix that are round-off: negative, or below eigh's accuracy.

    eigh is accurate to about D * eps * max|lambda|; a true zero eigenvalue (singular covariance, N <= D)
    comes back as +-1e-16-ish noise whose square root (~1e-8) would otherwise be summed D times.
    """
    tol = w.shape[0] * np.finfo(np.float64).eps * float(np.abs(w).max(initial=0.0))
    return np.where(w > tol, w, 0.0)


def _symmetric_sqrt(a: np.ndarray) -> np.ndarray:
    """Principal square root of a symmetric PSD matrix via eigh, round-off eigenvalues clipped to 0."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(_clip_eigenvalues(w))) @ v.T


def _check_stats(mu: Any, sigma: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    mu = _as_float64(mu, f"mu{name}")
    sigma = _as_float64(sigma, f"sigma{name}")
    if mu.ndim != 1:
        raise ValueError(f"mu{name}: expected a 1-D mean vector, got shape {mu.shape}")
    if sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"sigma{name}: expected shape {(mu.shape[0], mu.shape[0])} to match mu{name} "
                         f"of shape {mu.shape}, got {sigma.shape}")
    if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
        raise ValueError(f"mu{name}/sigma{name}: contain non-finite values")
    return mu, sigma


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """Fréchet (2-Wasserstein) distance between N(mu1, S1) and N(mu2, S2): the FID of Heusel et al. 2017.

    FID = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}) (Heusel et al. 2017, Eq. 6; Dowson & Landau 1982).
    Instead of ``scipy.linalg.sqrtm`` of the non-symmetric product S1 S2 (a Schur-based root that can return
    complex parts and lose accuracy when the covariances are singular, e.g. fewer samples than dimensions),
    we only need its trace: with A = S1^{1/2} (symmetric PSD, by eigh), S1 S2 = A (A S2) and
    M = (A S2) A = A S2 A share their eigenvalues (AB and BA always do), and M is symmetric PSD, so the
    eigenvalues of S1 S2 are real and >= 0 and Tr((S1 S2)^{1/2}) = sum_i sqrt(lambda_i(M)). Both square
    roots use ``eigh`` on symmetrised matrices with round-off eigenvalues (negative, or below eigh's
    D * eps * max|lambda| accuracy) clipped to 0, which is backward stable and never leaves the reals.
    Everything is float64; shape mismatches raise ValueError.
    """
    mu1, sigma1 = _check_stats(mu1, sigma1, "1")
    mu2, sigma2 = _check_stats(mu2, sigma2, "2")
    if mu1.shape != mu2.shape:
        raise ValueError(f"frechet_distance: mu1 has shape {mu1.shape} but mu2 has shape {mu2.shape}")
    diff = mu1 - mu2
    root1 = _symmetric_sqrt(sigma1)
    m = root1 @ sigma2 @ root1
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = float(np.sqrt(_clip_eigenvalues(eig)).sum())
    fd = float(diff @ diff) + float(np.trace(sigma1)) + float(np.trace(sigma2)) - 2.0 * tr_covmean
    return fd


def _polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int, gamma: float, coef0: float) -> np.ndarray:
    return (gamma * (x @ y.T) + coef0) ** degree


def _mmd2_unbiased(kxx: np.ndarray, kyy: np.ndarray, kxy: np.ndarray) -> float:
    m, n = kxx.shape[0], kyy.shape[0]
    sxx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    syy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    sxy = kxy.sum() / (m * n)
    return float(sxx + syy - 2.0 * sxy)


def kernel_inception_distance(
    f1: Any,
    f2: Any,
    *,
    subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    gamma: float | None = None,
    coef0: float = 1,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel Inception Distance: the unbiased MMD^2 between two feature sets (Binkowski et al. 2018).

    Binkowski et al. 2018 ("Demystifying MMD GANs", Sec. 4 / Eq. 2 for the unbiased estimator) define KID as
    MMD^2_u = 1/(m(m-1)) sum_{i!=j} k(x_i, x_j) + 1/(m(m-1)) sum_{i!=j} k(y_i, y_j) - 2/m^2 sum_{i,j} k(x_i, y_j)
    with the cubic polynomial kernel k(x, y) = (gamma x.y + coef0)^degree, gamma = 1/D by default. As in
    their code, it is averaged over ``subsets`` random subsets of ``subset_size`` rows drawn without
    replacement from each set (size clipped to the smaller set) by ``np.random.default_rng(seed)``; the
    result is (mean, std) over subsets (population std, ddof=0). Being unbiased, the mean can be slightly
    negative when both sets come from the same distribution.
    """
    x = _as_features(f1, "f1")
    y = _as_features(f2, "f2")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"kernel_inception_distance: feature dims differ, f1 {x.shape} vs f2 {y.shape}")
    if subsets < 1:
        raise ValueError(f"kernel_inception_distance: subsets must be >= 1, got {subsets}")
    if subset_size < 2:
        raise ValueError(f"kernel_inception_distance: subset_size must be >= 2, got {subset_size}")
    if degree < 1:
        raise ValueError(f"kernel_inception_distance: degree must be >= 1, got {degree}")
    g = 1.0 / x.shape[1] if gamma is None else float(gamma)
    m = min(subset_size, x.shape[0], y.shape[0])
    rng = np.random.default_rng(seed)
    values = np.empty(subsets, dtype=np.float64)
    for s in range(subsets):
        xs = x[rng.choice(x.shape[0], m, replace=False)]
        ys = y[rng.choice(y.shape[0], m, replace=False)]
        values[s] = _mmd2_unbiased(
            _polynomial_kernel(xs, xs, degree, g, coef0),
            _polynomial_kernel(ys, ys, degree, g, coef0),
            _polynomial_kernel(xs, ys, degree, g, coef0),
        )
    return float(values.mean()), float(values.std())


def inception_score(probs: Any, *, splits: int = 10) -> tuple[float, float]:
    """Inception Score exp(E_x KL(p(y|x) || p(y))) of class probabilities (Salimans et al. 2016).

    Salimans et al. 2016 ("Improved Techniques for Training GANs", Sec. 4) score a set of images by
    exp(E_x KL(p(y|x) || p(y))), where p(y|x) are the classifier's predicted probabilities and p(y) their
    mean over the set. As in their code the N rows of ``probs`` (N, K) are cut into ``splits`` contiguous
    chunks, the score is computed per chunk (with 0 log 0 = 0), and (mean, std) over chunks is returned
    (population std). Rows must be finite, non-negative and sum to 1 within 1e-4, and 1 <= splits <= N,
    else ValueError. The score lies in [1, K].
    """
    p = _as_float64(probs, "probs")
    if p.ndim != 2 or p.shape[0] < 1 or p.shape[1] < 1:
        raise ValueError(f"probs: expected a non-empty 2-D (N, K) array of probabilities, got shape {p.shape}")
    if not np.all(np.isfinite(p)):
        raise ValueError("probs: contains non-finite values (NaN or inf)")
    if np.any(p < 0):
        raise ValueError(f"probs: probabilities must be non-negative, min is {p.min():.3g}")
    row_err = np.abs(p.sum(axis=1) - 1.0)
    if np.any(row_err > 1e-4):
        raise ValueError(f"probs: every row must sum to 1 within 1e-4, worst deviation {row_err.max():.3g}")
    if not 1 <= splits <= p.shape[0]:
        raise ValueError(f"inception_score: splits must be in [1, N={p.shape[0]}], got {splits}")
    scores = []
    for chunk in np.array_split(p, splits, axis=0):
        py = chunk.mean(axis=0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(chunk > 0, chunk * (np.log(chunk) - np.log(py)), 0.0)
        scores.append(np.exp(terms.sum(axis=1).mean()))
    scores_arr = np.asarray(scores)
    return float(scores_arr.mean()), float(scores_arr.std())
