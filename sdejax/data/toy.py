"""Toy distributions made locally (no download), a deterministic train/held-out split, and a
stateless batch source for the training loop.

Names (`get_toy_distribution(name, **kwargs)`):

- `two_mode` (default): 0.2·N((−5,−5), I) + 0.8·N((5,5), I) in 2-D, the mixture of the notes,
  kept at its original scale (modes 14 apart, unit spread) so its numbers match the sampler tests;
  `scale=c` multiplies means and std by c. True entropy: H(0.2, 0.8) + log(2πe) nats (modes are
  well separated), 2.408 bits/dim.
- `gaussian_mixture`: Σ w_k N(μ_k, Σ_k) in any dimension (`weights`, `means`, `covs` or `std`).
- `eight_gaussians`: 8 modes on a circle, FFJORD's version (radius 4/√2, std 0.5/√2).
- `checkerboard`: uniform on the 8 black squares (side 2) of a 4×4 board on [−4, 4]² (FFJORD).
- `swiss_roll`: sklearn's swiss roll (noise 1), coordinates (x, z) divided by 5.

Mixtures and the checkerboard carry an exact `log_prob` (for the true entropy); the swiss roll has
none (`log_prob is None`).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from sdejax.analytic import GaussianMixture

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ToyDistribution:
    """A named distribution in R^dim: `sample(rng, n) -> (n, dim)`, optional exact `log_prob(x) -> (n,)`."""

    name: str
    dim: int
    sample: Callable[[Array, int], Array]
    log_prob: Optional[Callable[[Array], Array]] = None

    def entropy(self, rng: Array, n: int = 200_000) -> tuple[float, float]:
        """Monte-Carlo H = −E log p(x) in nats and its standard error (needs `log_prob`)."""
        if self.log_prob is None:
            raise ValueError(f"toy distribution {self.name!r} has no closed-form log_prob")
        logp = self.log_prob(self.sample(rng, n))
        return float(-jnp.mean(logp)), float(jnp.std(logp) / np.sqrt(n))


def _mixture(name: str, gm: GaussianMixture) -> ToyDistribution:
    return ToyDistribution(name, gm.dim, gm.sample, gm.log_prob)


def two_mode(scale: float = 1.0) -> ToyDistribution:
    """0.2·N((−5,−5), I) + 0.8·N((5,5), I), means and std multiplied by `scale`."""
    gm = GaussianMixture.create([0.2, 0.8], scale * np.array([[-5.0, -5.0], [5.0, 5.0]]), std=scale)
    return _mixture("two_mode", gm)


def gaussian_mixture(weights, means, covs=None, std: float = 1.0) -> ToyDistribution:
    """Σ w_k N(μ_k, Σ_k) in any dimension (`sdejax.analytic.GaussianMixture`)."""
    return _mixture("gaussian_mixture", GaussianMixture.create(weights, means, covs, std))


def eight_gaussians() -> ToyDistribution:
    """8 equal modes at 4(cos θ_k, sin θ_k)/√2, θ_k = kπ/4, std 0.5/√2 (FFJORD's normalisation)."""
    theta = np.arange(8) * np.pi / 4
    means = 4.0 * np.stack([np.cos(theta), np.sin(theta)], -1) / np.sqrt(2)
    return _mixture("eight_gaussians", GaussianMixture.create(np.ones(8), means, std=0.5 / np.sqrt(2)))


def _checkerboard_sample(rng: Array, n: int) -> Array:
    """x₁ ~ U[−2, 2], x₂ on the square of the same colour, both doubled: side-2 squares on [−4, 4]²."""
    k1, k2, k3 = jax.random.split(rng, 3)
    x1 = jax.random.uniform(k1, (n,), minval=-2.0, maxval=2.0)
    x2 = jax.random.uniform(k2, (n,)) - 2.0 * jax.random.randint(k3, (n,), 0, 2) + jnp.floor(x1) % 2
    return 2.0 * jnp.stack([x1, x2], -1)


def _checkerboard_log_prob(x: Array) -> Array:
    """−log 32 on the 8 squares of area 4 (total 32), −inf elsewhere."""
    inside = jnp.all(jnp.abs(x) <= 4.0, axis=-1)
    colour = (jnp.floor(x[:, 0] / 2) + jnp.floor(x[:, 1] / 2)) % 2 == 0
    return jnp.where(inside & colour, -np.log(32.0), -jnp.inf)


def checkerboard() -> ToyDistribution:
    return ToyDistribution("checkerboard", 2, _checkerboard_sample, _checkerboard_log_prob)


def _swiss_roll_sample(rng: Array, n: int) -> Array:
    """t = 1.5π(1 + 2u), (t cos t, t sin t) + N(0, I), divided by 5 (sklearn make_swiss_roll, noise 1)."""
    k1, k2 = jax.random.split(rng)
    t = 1.5 * np.pi * (1.0 + 2.0 * jax.random.uniform(k1, (n,)))
    x = jnp.stack([t * jnp.cos(t), t * jnp.sin(t)], -1) + jax.random.normal(k2, (n, 2))
    return x / 5.0


def swiss_roll() -> ToyDistribution:
    return ToyDistribution("swiss_roll", 2, _swiss_roll_sample)


TOY_DISTRIBUTIONS: dict[str, Callable[..., ToyDistribution]] = {
    "two_mode": two_mode,
    "gaussian_mixture": gaussian_mixture,
    "eight_gaussians": eight_gaussians,
    "checkerboard": checkerboard,
    "swiss_roll": swiss_roll,
}


def get_toy_distribution(name: str, **kwargs) -> ToyDistribution:
    """The toy distribution called `name`; unknown names raise ValueError listing the valid ones."""
    if name not in TOY_DISTRIBUTIONS:
        raise ValueError(f"unknown toy dataset {name!r}; valid: {sorted(TOY_DISTRIBUTIONS)}")
    return TOY_DISTRIBUTIONS[name](**kwargs)


def train_heldout_split(dist: ToyDistribution, rng: Array, num_train: int, num_heldout: int) -> tuple[Array, Array]:
    """Deterministic split: `num_train + num_heldout` draws from `rng`, the first `num_train` for
    training (empty when 0, meaning a fresh-sample stream), the rest held out."""
    x = dist.sample(rng, num_train + num_heldout)
    return x[:num_train], x[num_train:]


def make_batch_fn(dist: ToyDistribution, train_x: Array, batch_size: int) -> Callable[[Array], dict]:
    """Stateless source `batch_fn(rng) -> {"x": (batch_size, dim)}`: a uniform draw with replacement
    from `train_x`, or fresh samples of `dist` when `train_x` is empty. Pure and jit-able, so a
    batch depends only on its key (exact resume)."""
    if train_x.shape[0] == 0:
        return lambda rng: {"x": dist.sample(rng, batch_size)}
    return lambda rng: {"x": train_x[jax.random.randint(rng, (batch_size,), 0, train_x.shape[0])]}
