"""Closed-form Gaussian-mixture data under any linear SDE: exact scores and densities.

If p_0 = Σ_k w_k N(μ_k, Σ_k) and x_t = α_t x_0 + σ_t z, then

    p_t(x) = Σ_k w_k N(x; α_t μ_k, α_t² Σ_k + σ_t² I),

so the score ∇ log p_t and the density are exact at every t. (For VE, α = 1 and σ(t) includes σ_min,
the convention of `sdejax.sde.VESDE`.) Used as an oracle in the tests, and by users to study solvers
without training a network.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from sdejax.guidance import check_classes
from sdejax.sde import SDE, check_time

Array = jax.Array


def _component_terms(x: Array, alpha: Array, sigma: Array, means: Array, eigvals: Array, eigvecs: Array):
    """Per component k of p_t: log N(x; α μ_k, C_k) (B, K) and C_k⁻¹(x − α μ_k) (B, K, d), with
    C_k = U_k diag(α² λ_k + σ²) U_kᵀ from the eigendecomposition Σ_k = U_k diag(λ_k) U_kᵀ (no matrix
    factorisation inside jit: XLA:CPU's batched LAPACK calls can deadlock a 2-thread pool)."""
    d = x.shape[-1]
    a, s = alpha[:, None, None], sigma[:, None, None]
    var = a**2 * eigvals[None] + s**2  # (B, K, d)
    diff = x[:, None, :] - a * means[None]  # (B, K, d)
    proj = jnp.einsum("kij,bki->bkj", eigvecs, diff) / var  # U_kᵀ diff, scaled
    logp = -0.5 * (d * np.log(2 * np.pi) + jnp.sum(jnp.log(var), -1) + jnp.sum(proj**2 * var, -1))
    return logp, jnp.einsum("kij,bkj->bki", eigvecs, proj)


class GaussianMixture(NamedTuple):
    """Mixture Σ_k w_k N(μ_k, Σ_k) in R^d: weights (K,), means (K, d), covs (K, d, d), and the
    eigendecomposition Σ_k = U_k diag(λ_k) U_kᵀ (eigvals (K, d), eigvecs (K, d, d)). A pytree."""

    weights: Array
    means: Array
    covs: Array
    eigvals: Array
    eigvecs: Array

    @classmethod
    def create(cls, weights, means, covs=None, std: float = 1.0) -> "GaussianMixture":
        """Build a mixture; `covs` defaults to std² I for every component. Weights are normalised;
        covariances must be symmetric positive semi-definite (decomposed once here, in float64)."""
        means = np.atleast_2d(np.asarray(means, np.float64))
        k, d = means.shape
        weights = np.asarray(weights, np.float64)
        if weights.shape != (k,):
            raise ValueError(f"weights must have shape ({k},) to match means {means.shape}; got {weights.shape}")
        if not (np.all(weights >= 0) and weights.sum() > 0):
            raise ValueError(f"weights must be >= 0 with a positive sum; got {weights}")
        covs = np.broadcast_to(std**2 * np.eye(d), (k, d, d)) if covs is None else np.asarray(covs, np.float64)
        if covs.shape != (k, d, d):
            raise ValueError(f"covs must have shape ({k}, {d}, {d}); got {covs.shape}")
        if not np.allclose(covs, np.swapaxes(covs, -1, -2)):
            raise ValueError("covs must be symmetric")
        eigvals, eigvecs = np.linalg.eigh(covs)
        if np.any(eigvals < -1e-12 * np.abs(eigvals).max(initial=1.0)):
            raise ValueError(f"covs must be positive semi-definite; smallest eigenvalue {eigvals.min():g}")
        f32 = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731
        return cls(f32(weights / weights.sum()), f32(means), f32(covs), f32(np.maximum(eigvals, 0.0)), f32(eigvecs))

    @property
    def dim(self) -> int:
        return self.means.shape[-1]

    def sample(self, rng: Array, n: int) -> Array:
        """n draws, shape (n, d): μ_k + U_k sqrt(λ_k) z."""
        k_rng, z_rng = jax.random.split(rng)
        comp = jax.random.choice(k_rng, self.weights.shape[0], (n,), p=self.weights)
        z = jax.random.normal(z_rng, (n, self.dim)) * jnp.sqrt(self.eigvals[comp])
        return self.means[comp] + jnp.einsum("nij,nj->ni", self.eigvecs[comp], z)

    def _flat(self, x: Array) -> Array:
        x = jnp.reshape(x, (x.shape[0], -1))
        if x.shape[-1] != self.dim:
            raise ValueError(f"x has {x.shape[-1]} features per example; the mixture has dim {self.dim}")
        return x

    def marginal_coeffs_log_prob(self, x: Array, alpha: Array, sigma: Array) -> Array:
        """log p(x) of the mixture pushed through x ↦ α x + σ z, per example (α, σ of shape (B,))."""
        x = self._flat(x)
        comps, _ = _component_terms(x, alpha.astype(x.dtype), sigma.astype(x.dtype), *self._params(x.dtype))
        return jax.scipy.special.logsumexp(comps + jnp.log(self.weights.astype(x.dtype)), axis=-1)

    def _params(self, dtype) -> tuple[Array, Array, Array]:
        return tuple(v.astype(dtype) for v in (self.means, self.eigvals, self.eigvecs))

    def log_prob(self, x: Array) -> Array:
        """log p_0(x) per example, shape (B,)."""
        ones = jnp.ones(x.shape[:1], x.dtype)
        return self.marginal_coeffs_log_prob(x, ones, jnp.zeros_like(ones))

    def marginal_log_prob(self, sde: SDE, x: Array, t: Array) -> Array:
        """log p_t(x) under `sde`, per example; x of shape (B, d) or (B, ...) with d features."""
        check_time(x, t)
        alpha, sigma = sde.marginal_coeffs(t)
        return self.marginal_coeffs_log_prob(x, alpha, sigma)

    def _terms(self, sde: SDE, x: Array, t: Array) -> tuple[Array, Array, Array]:
        """(flattened x, log w_k + log N_k,t(x) (B, K), C_k⁻¹(x − α μ_k) (B, K, d)) at time t."""
        check_time(x, t)
        flat = self._flat(x)
        alpha, sigma = (v.astype(flat.dtype) for v in sde.marginal_coeffs(t))
        comps, solved = _component_terms(flat, alpha, sigma, *self._params(flat.dtype))
        return flat, comps + jnp.log(self.weights.astype(flat.dtype)), solved

    def log_posterior(self, sde: SDE, x: Array, t: Array) -> Array:
        """log p_t(k | x) = log w_k N_k,t(x) − log Σ_j w_j N_j,t(x), shape (B, K): the exact
        noise-conditional classifier when each component is a class."""
        _, joint, _ = self._terms(sde, x, t)
        return jax.nn.log_softmax(joint, axis=-1)

    def marginal_score(self, sde: SDE, x: Array, t: Array, y: Array | None = None) -> Array:
        """∇_x log p_t(x) = −Σ_k r_k(x) C_k⁻¹(x − α μ_k), r_k the posterior component weights; with
        integer classes `y` (B,), the class-conditional score ∇_x log p_t(x | y) = −C_y⁻¹(x − α μ_y).
        Shaped like x."""
        flat, joint, solved = self._terms(sde, x, t)
        if y is None:
            resp = jax.nn.softmax(joint, axis=-1)
        else:
            resp = jax.nn.one_hot(check_classes("y", y, flat.shape[0], self.weights.shape[0]),
                                  self.weights.shape[0], dtype=flat.dtype)
        return jnp.reshape(-jnp.einsum("bk,bki->bi", resp, solved), x.shape)

    def score_fn(self, sde: SDE, y: Array | None = None) -> Partial:
        """The exact score function `score_fn(x, t)` of this mixture under `sde` (of class `y` when
        given), a `Partial` carrying the mixture and `y` as leaves."""
        return Partial(_mixture_score, self, sde, y=y)

    def classifier_fn(self, sde: SDE) -> Partial:
        """`log_prob_fn(x, t) -> log p_t(k | x)` (B, K): the exact classifier for guidance."""
        return Partial(_mixture_log_posterior, self, sde)

    def entropy(self, rng: Array, n: int = 200_000) -> tuple[Array, Array]:
        """Monte-Carlo estimate of H = −E log p_0(x) in nats and its standard error."""
        logp = self.log_prob(self.sample(rng, n))
        return -jnp.mean(logp), jnp.std(logp) / np.sqrt(n)


def _mixture_score(mixture: GaussianMixture, sde: SDE, x: Array, t: Array, y: Array | None = None) -> Array:
    return mixture.marginal_score(sde, x, t, y)


def _mixture_log_posterior(mixture: GaussianMixture, sde: SDE, x: Array, t: Array) -> Array:
    return mixture.log_posterior(sde, x, t)
