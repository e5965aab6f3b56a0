"""Ancestral sampling of masked (absorbing-state) diffusion (`sdejax.masked`).

On a grid 1 = t_N > … > t_0 = 0 the reverse step from t to s < t starts all-MASK and, per token,

    p(z_s,i | z_t) = δ(z_s,i = z_t,i)                                  if z_t,i ≠ MASK (carry-over),
                   = (1 − q) δ(z_s,i = MASK) + q p_θ(z_s,i = v | z_t)   otherwise,
    q = (α_s − α_t) / (1 − α_t)   (the probability of unmasking between s and t; q = 1 at s = 0).

`step_probs` gives these exact per-step probabilities over K+1 outcomes; the draw is one categorical
over them (MD4's `ancestral_sample_step`). Tokens are conditionally independent given z_t, so a step
that unmasks several tokens at once samples the product of their conditionals, not their joint: the
sampler is exact for an exact denoiser only when no two tokens unmask in the same step (probability
→ 1 as N → ∞), and with N = 1 it samples the product of the marginals.

The categorical draw is by inverse CDF, index = #{k : F_k ≤ u F_K} with u ~ U[0, 1) in `dtype`.
In float32 u is a multiple of 2⁻²⁴ and the cumulative sums round at ~2⁻²⁴, so probabilities below
~1e-7 are mis-sampled; Gumbel-max in float32 has the same defect, as −log(−log u) ≤ ~16.6 truncates
the Gumbel tail and under-samples rare tokens (mdlm #36). For large vocabularies pass
dtype=jnp.float64 inside a `with jax.enable_x64(True):` scope (resolution 2⁻⁵³).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from sdejax.masked import MaskingSchedule, subs_log_probs

Array = jax.Array
GRIDS = ("uniform", "cosine")


def time_grid(num_steps: int, grid: str = "uniform") -> Array:
    """t_0 = 0 < … < t_N = 1: uniform j/N, or MD4's cosine grid 1 − cos(π/2 · j/N) (finer near 0)."""
    if grid not in GRIDS:
        raise ValueError(f"unknown time grid {grid!r}; valid: {list(GRIDS)}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1; got {num_steps}")
    u = jnp.linspace(0.0, 1.0, num_steps + 1)
    return u if grid == "uniform" else 1.0 - jnp.cos(0.5 * jnp.pi * u)


def step_probs(logits: Array, z: Array, alpha_s: Array, alpha_t: Array) -> Array:
    """p(z_s | z_t) per token over K+1 outcomes (..., K+1), from denoiser logits (..., K) at z (...):
    a masked token -> [q p_θ(v | z_t) for v < K, 1 − q], an unmasked one -> one-hot on itself."""
    num_tokens = logits.shape[-1]
    p = jnp.exp(subs_log_probs(logits, z))
    q = jnp.clip((alpha_s - alpha_t) / (1.0 - alpha_t), 0.0, 1.0)
    masked = jnp.concatenate([q * p[..., :num_tokens], jnp.broadcast_to(1.0 - q, p.shape[:-1] + (1,))], axis=-1)
    return jnp.where((z == num_tokens)[..., None], masked, p)


def categorical(key: Array, probs: Array, dtype=jnp.float32) -> Array:
    """Index ~ probs (..., n) by inverse CDF in `dtype` (float64 needs `jax.enable_x64(True)`)."""
    if jnp.zeros((), dtype).dtype != jnp.dtype(dtype):
        raise ValueError(f"dtype {jnp.dtype(dtype)} is unavailable; for float64 use `with jax.enable_x64(True):`")
    cdf = jnp.cumsum(probs.astype(dtype), axis=-1)
    u = jax.random.uniform(key, probs.shape[:-1], dtype) * cdf[..., -1]
    return jnp.minimum(jnp.sum(cdf <= u[..., None], axis=-1), probs.shape[-1] - 1)


def ancestral_sample(key: Array, denoise_fn: Callable[[Array, Array], Array], shape: tuple[int, ...],
                     num_tokens: int, schedule: str = "linear", num_steps: int = 64, grid: str = "uniform",
                     dtype=jnp.float32) -> Array:
    """Tokens (B, ...) = `shape` in {0..K−1}: from all-MASK, N ancestral steps t_j -> t_{j−1}.
    denoise_fn(z (B, ...), t (B,)) -> logits (B, ..., K). Step j draws with fold_in(key, j)."""
    sched = MaskingSchedule(schedule)
    times = time_grid(num_steps, grid)
    z0 = jnp.full(shape, num_tokens, jnp.int32)

    def step(z, j):
        t, s = times[j], times[j - 1]
        logits = denoise_fn(z, jnp.full((shape[0],), t))
        probs = step_probs(logits, z, sched.alpha(s), sched.alpha(t))
        return categorical(jax.random.fold_in(key, j), probs, dtype).astype(jnp.int32), None

    z, _ = jax.lax.scan(step, z0, jnp.arange(num_steps, 0, -1))
    return z
