"""DDIM (Song, Meng & Ermon, 2021) for any linear SDE x_t = α_t x_0 + σ_t z, and the x̂_0 estimate.

Between grid times s < t, with x̂_0 the Tweedie estimate at (x_t, t) and ε̂ = (x_t − α_t x̂_0)/σ_t,

    x_s = α_s x̂_0 + sqrt(σ_s² − c²) ε̂ + c z,   c = η σ̃,   σ̃² = σ_s² (1 − α_t² σ_s² / (α_s² σ_t²)).

σ̃² is the variance of the Gaussian posterior q(x_s | x_t, x_0) of the SDE (whose transition x_s → x_t
has mean α_t/α_s x_s and variance σ_t² − (α_t/α_s)² σ_s²), so η = 0 is the deterministic DDIM and
η = 1 draws from q(x_s | x_t, x̂_0): DDPM ancestral sampling with the posterior variance β̃.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.tree_util import Partial

from sdejax.score import convert
from sdejax.sde import SDE, batch_broadcast

Array = jax.Array
ScoreFn = Callable[[Array, Array], Array]
Clip = tuple[float, float] | None


def score_pytree(score_fn: ScoreFn) -> Partial:
    """`score_fn` as a pytree, so jitted samplers take it as an argument.

    A `jax.tree_util.Partial(fn, params, ...)` is kept as is: its arguments (e.g. network parameters)
    are traced, so new parameters reuse the compiled sampler. Any other callable is wrapped as
    `Partial(score_fn)` and compiled once per function object.
    """
    return score_fn if isinstance(score_fn, Partial) else Partial(score_fn)


def check_clip(clip_x0: Clip) -> Clip:
    """Validate `clip_x0 = (lo, hi)` and make it hashable (a jit-static argument)."""
    if clip_x0 is None:
        return None
    lo, hi = (float(v) for v in clip_x0)
    if not lo < hi:
        raise ValueError(f"clip_x0 must be (lo, hi) with lo < hi; got {clip_x0}")
    return lo, hi


def x0_estimate(sde: SDE, score_fn: ScoreFn, x: Array, t: Array, clip_x0: Clip = None) -> Array:
    """Tweedie's estimate x̂_0 = E[x_0 | x_t] = (x_t + σ_t² ∇log p_t(x_t)) / α_t, optionally clipped."""
    alpha, sigma = sde.marginal_coeffs(t)
    x0 = convert(score_fn(x, t), "score", "x0", x, alpha, sigma)
    return x0 if clip_x0 is None else jnp.clip(x0, *clip_x0)


def ddim_step(sde: SDE, x: Array, x0: Array, t: Array, s: Array, eta: float | Array, z: Array) -> Array:
    """One DDIM step from time t to s < t given x̂_0 (module docstring): returns x_s."""
    a_t, s_t = (batch_broadcast(v, x) for v in sde.marginal_coeffs(t))
    a_s, s_s = (batch_broadcast(v, x) for v in sde.marginal_coeffs(s))
    ratio = (a_t * s_s) / (a_s * s_t)
    c = eta * s_s * jnp.sqrt(jnp.maximum(1.0 - ratio**2, 0.0))
    k = jnp.sqrt(jnp.maximum(s_s**2 - c**2, 0.0))
    # α_s x̂0 + k (x − α_t x̂0)/σ_t, grouped so that no difference of near-equal terms is formed.
    return (k / s_t) * x + (a_s - k * a_t / s_t) * x0 + c * z


@functools.partial(jax.jit, static_argnames=("sde", "shape", "clip_x0"))
def _ddim(rng, score_fn, num_steps, eta, eps, *, sde, shape, clip_x0):
    prior_rng, rng = jax.random.split(rng)
    x = sde.prior_sampling(prior_rng, shape)
    ones = jnp.ones(shape[:1], x.dtype)
    dt = (eps - sde.T) / (num_steps - 1)

    def body(i, x):
        t, s = (sde.T + i * dt) * ones, (sde.T + (i + 1) * dt) * ones
        x0 = x0_estimate(sde, score_fn, x, t, clip_x0)
        z = jax.random.normal(jax.random.fold_in(rng, i), shape, x.dtype)
        return ddim_step(sde, x, x0, t, s, eta, z)

    x = jax.lax.fori_loop(0, num_steps - 1, body, x)
    return x0_estimate(sde, score_fn, x, eps * ones, clip_x0)


def ddim_sample(
    rng: Array,
    sde: SDE,
    score_fn: ScoreFn,
    shape: tuple[int, ...],
    num_steps: int,
    eta: float = 0.0,
    eps: float = 1e-3,
    clip_x0: Clip = None,
) -> tuple[Array, int]:
    """DDIM sampling on the uniform grid t_i = linspace(T, eps, num_steps); returns `(samples, nfe)`.

    num_steps − 1 DDIM steps t_i → t_{i+1}, then the output is x̂_0 at t = eps (the Tweedie denoising,
    as `pc_sample(denoise=True)`; it is also the last step of DDIM, whose final time has α = 1, σ = 0).
    NFE = num_steps. `eta` ∈ [0, 1]: 0 deterministic, 1 DDPM with posterior variance. `clip_x0=(lo, hi)`
    clips every x̂_0 (and so the output) to the data range.
    """
    if int(num_steps) != num_steps or num_steps < 2:
        raise ValueError(f"num_steps must be an integer >= 2; got {num_steps}")
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1]; got {eta}")
    if not 0.0 < eps < sde.T:
        raise ValueError(f"eps must be in (0, T={sde.T}); got {eps}")
    samples = _ddim(
        rng, score_pytree(score_fn), int(num_steps), float(eta), float(eps),
        sde=sde, shape=tuple(shape), clip_x0=check_clip(clip_x0),
    )
    return samples, int(num_steps)
