"""Sample-quality metrics on Inception features, in float64 numpy.

* FID   = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))
* KID   = unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3, averaged over TF-GAN's blocks
* IS    = exp(E_x KL(p(y|x) || p(y))), mean and std over splits
* SW2   = sqrt(E_u W2²(u·a, u·b)) over random unit directions u (sliced 2-Wasserstein, any features)
"""
from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (negative rounding eigenvalues -> 0)."""
    eigvals, eigvecs = np.linalg.eigh(matrix)
    return (eigvecs * np.sqrt(np.clip(eigvals, 0, None))) @ eigvecs.T


def trace_sqrt_product(sigma1: ArrayLike, sigma2: ArrayLike) -> float:
    """tr((S1 S2)^(1/2)) = sum_i sqrt(lambda_i(S1^(1/2) S2 S1^(1/2))), computed with eigh.

    The symmetric form has the same eigenvalues as S1 S2 and stays real and finite for
    singular covariances (fewer samples than features), where scipy's sqrtm of S1 S2 does not.
    """
    root = _psd_sqrt(np.asarray(sigma1, np.float64))
    inner = root @ np.asarray(sigma2, np.float64) @ root
    eigvals = np.linalg.eigvalsh((inner + inner.T) / 2)
    return float(np.sqrt(np.clip(eigvals, 0, None)).sum())


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (FID on pool3 statistics)."""
    mu1, mu2 = _vector(mu1, "mu1"), _vector(mu2, "mu2")
    sigma1, sigma2 = _square(sigma1, "sigma1", mu1.size), _square(sigma2, "sigma2", mu1.size)
    if mu2.size != mu1.size:
        raise ValueError(f"mu2 has {mu2.size} features but mu1 has {mu1.size}")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2)
                 - 2 * trace_sqrt_product(sigma1, sigma2))


def _polynomial_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a @ b.T / a.shape[1] + 1) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """sum_{i!=j} k(x_i,x_j)/(m(m-1)) + sum_{i!=j} k(y_i,y_j)/(n(n-1)) - 2 sum_ij k(x_i,y_j)/(mn)."""
    m, n = len(x), len(y)
    kxx, kyy = _polynomial_kernel(x, x), _polynomial_kernel(y, y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1))
                 + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2 * _polynomial_kernel(x, y).mean())


def kid_blocks(features1: ArrayLike, features2: ArrayLike, max_block_size: int = 1024) -> np.ndarray:
    """Per-block unbiased MMD^2 as in TF-GAN: both sets cut into ceil(max(m, n) / max_block_size)
    contiguous blocks (sizes differ by at most one, larger blocks last)."""
    x, y = _features(features1, "features1"), _features(features2, "features2")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"features1 has {x.shape[1]} features but features2 has {y.shape[1]}")
    blocks = math.ceil(max(len(x), len(y)) / max_block_size)
    if min(len(x), len(y)) < 2 * blocks:
        raise ValueError(f"KID needs at least 2 rows per block; got {len(x)} and {len(y)} rows "
                         f"for {blocks} blocks")
    bx = [len(x) * i // blocks for i in range(blocks + 1)]
    by = [len(y) * i // blocks for i in range(blocks + 1)]
    return np.array([mmd2_unbiased(x[bx[i]:bx[i + 1]], y[by[i]:by[i + 1]]) for i in range(blocks)])


def kid(features1: ArrayLike, features2: ArrayLike, max_block_size: int = 1024) -> float:
    """Kernel Inception distance: the mean of ``kid_blocks`` (one block up to 1024 rows)."""
    return float(kid_blocks(features1, features2, max_block_size).mean())


def kid_std_error(block_values: np.ndarray) -> float:
    """Standard error of the blocked KID: sqrt(var_{ddof=1}(blocks) / n_blocks); nan for one block."""
    if len(block_values) < 2:
        return float("nan")
    return float(np.sqrt(np.var(block_values, ddof=1) / len(block_values)))


def inception_score(logits: ArrayLike, splits: int = 10) -> tuple[float, float]:
    """(mean, std) over ``splits`` contiguous parts of exp(mean_x KL(p(y|x) || mean_x p(y|x)))."""
    logits = _features(logits, "logits")
    if not 1 <= splits <= len(logits):
        raise ValueError(f"splits must be in [1, {len(logits)}] for {len(logits)} logits; got {splits}")
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    bounds = [len(logits) * i // splits for i in range(splits + 1)]
    scores = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        part = log_p[lo:hi]
        log_marginal = np.log(np.exp(part).mean(axis=0))
        kl = (np.exp(part) * (part - log_marginal)).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


def sliced_wasserstein(a: ArrayLike, b: ArrayLike, seed: int = 7, directions: int = 256) -> float:
    """Sliced W2 of two equal-size samples (n, d): sqrt(mean over `directions` random unit u of
    W2²(u·a, u·b)), each 1-D W2² the mean squared difference of the sorted projections."""
    a, b = _features(a, "a"), _features(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"sliced_wasserstein needs samples of equal shape; got a {a.shape}, b {b.shape}")
    u = np.random.default_rng(seed).standard_normal((directions, a.shape[1]))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    pa, pb = np.sort(a @ u.T, axis=0), np.sort(b @ u.T, axis=0)
    return float(np.sqrt(np.mean((pa - pb) ** 2)))


def _vector(value: ArrayLike, name: str) -> np.ndarray:
    array = np.asarray(value, np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a vector (D,); got shape {array.shape}")
    return array


def _square(value: ArrayLike, name: str, dim: int) -> np.ndarray:
    array = np.asarray(value, np.float64)
    if array.shape != (dim, dim):
        raise ValueError(f"{name} must have shape ({dim}, {dim}); got {array.shape}")
    return array


def _features(value: ArrayLike, name: str) -> np.ndarray:
    array = np.asarray(value)
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{name} must be a float array (N, D); got shape {array.shape}, dtype {array.dtype}")
    return array.astype(np.float64)
