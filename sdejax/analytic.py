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

from sdejax.sde import SDE, check_time

Array = jax.Array


def _gaussian_log_prob(x: Array, means: Array, covs: Array) -> Array:
    """log N(x; μ_k, C_k) for x (B, d), means (B, K, d), covs (B, K, d, d) -> (B, K)."""
    d = x.shape[-1]
    chol = jnp.linalg.cholesky(covs)
    diff = x[:, None, :] - means
    sol = jax.scipy.linalg.solve_triangular(chol, diff[..., None], lower=True)[..., 0]
    logdet = 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), axis=-1)
    return -0.5 * (d * np.log(2 * np.pi) + logdet + jnp.sum(sol**2, axis=-1))


class GaussianMixture(NamedTuple):
    """Mixture Σ_k w_k N(μ_k, Σ_k) in R^d: weights (K,), means (K, d), covs (K, d, d). A pytree."""

    weights: Array
    means: Array
    covs: Array

    @classmethod
    def create(cls, weights, means, covs=None, std: float = 1.0) -> "GaussianMixture":
        """Build a mixture; `covs` defaults to std² I for every component. Weights are normalised."""
        means = jnp.atleast_2d(jnp.asarray(means, jnp.float32))
        k, d = means.shape
        weights = jnp.asarray(weights, jnp.float32)
        if weights.shape != (k,):
            raise ValueError(f"weights must have shape ({k},) to match means {means.shape}; got {weights.shape}")
        if covs is None:
            covs = jnp.broadcast_to(std**2 * jnp.eye(d), (k, d, d))
        covs = jnp.asarray(covs, jnp.float32)
        if covs.shape != (k, d, d):
            raise ValueError(f"covs must have shape ({k}, {d}, {d}); got {covs.shape}")
        return cls(weights / jnp.sum(weights), means, covs)

    @property
    def dim(self) -> int:
        return self.means.shape[-1]

    def sample(self, rng: Array, n: int) -> Array:
        """n draws, shape (n, d)."""
        k_rng, z_rng = jax.random.split(rng)
        comp = jax.random.choice(k_rng, self.weights.shape[0], (n,), p=self.weights)
        z = jax.random.normal(z_rng, (n, self.dim))
        chol = jnp.linalg.cholesky(self.covs)[comp]
        return self.means[comp] + jnp.einsum("nij,nj->ni", chol, z)

    def marginal_coeffs_log_prob(self, x: Array, alpha: Array, sigma: Array) -> Array:
        """log p(x) of the mixture pushed through x ↦ α x + σ z, per example (α, σ of shape (B,))."""
        x = jnp.reshape(x, (x.shape[0], -1))
        if x.shape[-1] != self.dim:
            raise ValueError(f"x has {x.shape[-1]} features per example; the mixture has dim {self.dim}")
        a, s = alpha[:, None, None], sigma[:, None, None]
        means = a * self.means[None]
        covs = a[..., None] ** 2 * self.covs[None] + s[..., None] ** 2 * jnp.eye(self.dim)
        comps = _gaussian_log_prob(x, means, covs)
        return jax.scipy.special.logsumexp(comps + jnp.log(self.weights), axis=-1)

    def log_prob(self, x: Array) -> Array:
        """log p_0(x) per example, shape (B,)."""
        ones = jnp.ones(x.shape[:1], x.dtype)
        return self.marginal_coeffs_log_prob(x, ones, jnp.zeros_like(ones))

    def marginal_log_prob(self, sde: SDE, x: Array, t: Array) -> Array:
        """log p_t(x) under `sde`, per example; x of shape (B, d) or (B, ...) with d features."""
        check_time(x, t)
        alpha, sigma = sde.marginal_coeffs(t)
        return self.marginal_coeffs_log_prob(x, alpha, sigma)

    def marginal_score(self, sde: SDE, x: Array, t: Array) -> Array:
        """∇_x log p_t(x), shaped like x."""
        return jax.grad(lambda y: jnp.sum(self.marginal_log_prob(sde, y, t)))(x)

    def score_fn(self, sde: SDE):
        """The exact score function `score_fn(x, t)` of this mixture under `sde`."""
        return lambda x, t: self.marginal_score(sde, x, t)

    def entropy(self, rng: Array, n: int = 200_000) -> tuple[Array, Array]:
        """Monte-Carlo estimate of H = −E log p_0(x) in nats and its standard error."""
        logp = self.log_prob(self.sample(rng, n))
        return -jnp.mean(logp), jnp.std(logp) / np.sqrt(n)
