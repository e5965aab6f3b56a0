"""Consistency-model sampling (Song et al. 2023, Alg. 1): one step x = f(σ_max z, σ_max), or several
on a descending σ_0 > σ_1 > … > σ_{n−1} (each ≥ σ_min):

    x ← σ_0 z₀;  for i = 0 … n−1:  x̂ = f(x, σ_i);  x ← x̂ + sqrt(σ_{i+1}² − σ_min²) z_{i+1} (i < n−1).

`f(x, sigma)` is a consistency function (`sdejax.consistency.get_consistency_fn`), sigma of shape
(batch,). The caller owns the key: z_i = normal(split(rng, n)[i]). NFE = n. Jit-friendly (the σ's
may be traced; a concrete sequence is checked first).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def _check_sigmas(sigmas: Any, sigma_min: float) -> None:
    if isinstance(sigmas, jax.core.Tracer):
        return
    s = np.asarray(sigmas, np.float64)
    if s.ndim != 1 or s.size < 1 or not np.all(np.isfinite(s)):
        raise ValueError(f"sigmas must be a 1-D finite sequence with at least one entry; got {sigmas!r}")
    if not (np.all(np.diff(s) < 0) and s[-1] >= sigma_min):
        raise ValueError(f"sigmas must be strictly decreasing and >= sigma_min = {sigma_min}; got {s}")


def consistency_sample(f: Callable[[Array, Array], Array], rng: Array, shape: tuple[int, ...], sigmas: Any,
                       sigma_min: float = 0.002, dtype: Any = jnp.float32) -> tuple[Array, int]:
    """(samples of `shape`, NFE = len(sigmas)) by multistep consistency sampling (module docstring)."""
    _check_sigmas(sigmas, sigma_min)
    sig = jnp.asarray(sigmas, dtype)
    keys = jax.random.split(rng, sig.shape[0])
    ones = jnp.ones(shape[:1], dtype)
    x0 = f(sig[0] * jax.random.normal(keys[0], shape, dtype), sig[0] * ones)

    def step(x_hat: Array, inputs: tuple[Array, Array]) -> tuple[Array, None]:
        s, key = inputs
        x = x_hat + jnp.sqrt(s**2 - sigma_min**2) * jax.random.normal(key, shape, dtype)
        return f(x, s * ones), None

    x0, _ = jax.lax.scan(step, x0, (sig[1:], keys[1:]))
    return x0, int(sig.shape[0])


def onestep_sample(f: Callable[[Array, Array], Array], rng: Array, shape: tuple[int, ...], sigma_max: float = 80.0,
                   dtype: Any = jnp.float32) -> tuple[Array, int]:
    """(f(σ_max z, σ_max), 1): the one-step sampler."""
    return consistency_sample(f, rng, shape, [sigma_max], 0.0, dtype)


__all__ = ["consistency_sample", "onestep_sample"]
