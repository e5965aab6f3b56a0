"""Langevin dynamics: annealed (NCSN, Song & Ermon 2019, Alg. 1) and plain, with step x ← x + (α/2) s + sqrt(α) z.

Annealed: for noise levels σ_1 > … > σ_L, n_steps_each steps at each level with α_i = step_lr·σ_i²/σ_L²
and the score of p_{σ_i}, i.e. `score_fn(x, t_i)` at the time t_i with σ(t_i) = σ_i. The SDE must be
variance exploding (α_t = 1), so that p_{t_i} is the data convolved with N(0, σ_i² I); t_i is found by
bisection on `marginal_coeffs`, so any such SDE works, not only `VESDE`.

Non-finite values are watched as in `sdejax.sampling.loop` (its `_watch`: one isfinite reduction of
the state per step, no extra score evaluation): the loop carries the first state index at which some
example is non-finite and how many are, and both samplers raise `NonFiniteError` naming the noise
level (1 … L, and its σ) and the step within it, or the initial samples or the final denoising step,
and the count of examples. Inside the caller's own jit nothing can be raised: the NaN stays.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from sdejax.sampling.common import initial_x
from sdejax.sampling.loop import NonFiniteError, Watch, _watch, check_x, is_traced, score_pytree
from sdejax.score import tweedie_x0
from sdejax.sde import SDE

Array = jax.Array
ScoreFn = Callable[[Array, Array], Array]


def t_of_sigma(sde: SDE, sigmas, iters: int = 40, dtype=jnp.float32) -> Array:
    """Times t ∈ [0, T] with σ_t = sigmas, by bisection in `dtype` (σ_t from `marginal_coeffs`, increasing in t).

    Raises ValueError for σ outside [σ_0, σ_T] or an SDE whose σ_t is not increasing.
    """
    sigmas = jnp.asarray(sigmas, dtype)
    lo_sigma, hi_sigma = (float(sde.marginal_coeffs(jnp.array([v], jnp.float32))[1][0]) for v in (0.0, sde.T))
    if not hi_sigma > lo_sigma:
        raise ValueError(f"{type(sde).__name__}: sigma_t must increase from t=0 to T; got {lo_sigma} -> {hi_sigma}")
    s = np.asarray(sigmas)
    if np.any(s < lo_sigma * (1 - 1e-5)) or np.any(s > hi_sigma * (1 + 1e-5)):
        raise ValueError(
            f"sigmas must lie in [sigma(0), sigma(T)] = [{lo_sigma:g}, {hi_sigma:g}] of {type(sde).__name__}; "
            f"got range [{s.min():g}, {s.max():g}]"
        )
    lo, hi = jnp.zeros_like(sigmas), jnp.full_like(sigmas, sde.T)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        below = sde.marginal_coeffs(mid)[1] < sigmas
        lo, hi = jnp.where(below, mid, lo), jnp.where(below, hi, mid)
    return 0.5 * (lo + hi)


def default_sigmas(sde: SDE) -> np.ndarray:
    """N levels geometric from σ_T down to σ_0 (for `VESDE`: its `discrete_sigmas`, descending)."""
    ends = sde.marginal_coeffs(jnp.array([sde.T, 0.0], jnp.float32))[1]
    return np.geomspace(float(ends[0]), float(ends[1]), sde.N)


@functools.partial(jax.jit, static_argnames=("sde", "denoise"))
def _annealed(rng, score_fn, x, sigmas, ts, n_steps_each, step_lr, *, sde, denoise):
    """Samples and the watch: state index 0 is the init, k + 1 after step k, L·n_steps_each + 1 the output."""
    ones = jnp.ones(x.shape[:1], x.dtype)
    total = sigmas.shape[0] * n_steps_each

    def body(k, carry):
        x, watch = carry
        i = k // n_steps_each
        alpha = step_lr * (sigmas[i] / sigmas[-1]) ** 2
        z = jax.random.normal(jax.random.fold_in(rng, k), x.shape, x.dtype)
        x = x + 0.5 * alpha * score_fn(x, ts[i] * ones) + jnp.sqrt(alpha) * z
        return x, _watch(watch, k + 1, x)

    x, watch = jax.lax.fori_loop(0, total, body, (x, _watch((jnp.int32(-1), jnp.int32(0)), 0, x)))
    if denoise:
        x = tweedie_x0(sde, score_fn, x, ts[-1] * ones)
        watch = _watch(watch, total + 1, x)
    return x, watch


def _where_annealed(k: int, sigmas: np.ndarray, n_steps_each: int) -> str:
    """Where state index k of `_annealed`'s watch lies: the init, a level and step, or the denoising."""
    total = sigmas.size * n_steps_each
    if k == 0:
        return "in init"
    if k > total:
        return f"in the final denoising step (sigma = {sigmas[-1]:.4g})"
    level, step = divmod(k - 1, n_steps_each)
    return (f"at noise level {level + 1} of {sigmas.size} (sigma = {sigmas[level]:.4g}), "
            f"step {step + 1} of {n_steps_each}")


def _raise_if_nonfinite(what: str, watch: Watch, where, batch: int) -> None:
    """`NonFiniteError` if the watch saw a non-finite example (`where(k)` names state index k); not under
    the caller's jit, where the NaN stays in the samples."""
    if is_traced(watch):
        return
    k, count = (int(v) for v in jax.device_get(watch))
    if k >= 0:
        raise NonFiniteError(f"{what}: non-finite score or state {where(k)} in {count} of {batch} examples")


def annealed_langevin_sample(
    rng: Array,
    sde: SDE,
    score_fn: ScoreFn,
    shape: tuple[int, ...],
    n_steps_each: int,
    step_lr: float,
    denoise: bool = True,
    init: Array | None = None,
    sigmas=None,
    *,
    dtype=None,
) -> tuple[Array, int]:
    """Annealed Langevin dynamics (module docstring); returns `(samples, nfe)`, NFE = L·n_steps_each + denoise.

    `sigmas`: descending noise levels (default `default_sigmas(sde)`); `init`: initial samples of `shape`
    (default: the prior, drawn in `dtype`, default float32; a given `init` keeps its own). `denoise` ends
    with Tweedie's x + σ_L² s(x, t_L) (NCSNv2's final step). Runs in the dtype of the initial samples.
    A non-finite init, state or output raises `NonFiniteError` naming the noise level and step (module docstring).
    """
    if int(n_steps_each) != n_steps_each or n_steps_each < 1:
        raise ValueError(f"n_steps_each must be an integer >= 1; got {n_steps_each}")
    if not step_lr > 0:
        raise ValueError(f"step_lr must be > 0; got {step_lr}")
    alphas = np.asarray(sde.marginal_coeffs(jnp.linspace(0.0, sde.T, 11))[0])
    if not np.allclose(alphas, 1.0, rtol=0, atol=1e-6):
        raise ValueError(
            f"annealed Langevin needs a variance-exploding SDE (alpha_t = 1); {type(sde).__name__} has "
            f"alpha_t in [{alphas.min():.4g}, {alphas.max():.4g}] on [0, T]"
        )
    sigmas = default_sigmas(sde) if sigmas is None else np.asarray(sigmas, np.float64)
    if sigmas.ndim != 1 or sigmas.size < 1 or np.any(np.diff(sigmas) >= 0):
        raise ValueError(f"sigmas must be a non-empty 1-D descending array; got {sigmas}")
    init_rng, rng = jax.random.split(rng)
    x = initial_x(sde, init_rng, shape, init, dtype, name="init")
    ts = t_of_sigma(sde, sigmas, dtype=x.dtype)
    x, watch = _annealed(
        rng, score_pytree(score_fn), x, jnp.asarray(sigmas, x.dtype), ts,
        int(n_steps_each), float(step_lr), sde=sde, denoise=bool(denoise),
    )
    _raise_if_nonfinite("annealed_langevin_sample", watch, lambda k: _where_annealed(k, sigmas, int(n_steps_each)),
                        int(x.shape[0]))
    return x, sigmas.size * int(n_steps_each) + int(denoise)


@jax.jit
def _plain(rng, score_fn, x, n_steps, step_size):
    def body(k, carry):
        x, watch = carry
        z = jax.random.normal(jax.random.fold_in(rng, k), x.shape, x.dtype)
        x = x + 0.5 * step_size * score_fn(x) + jnp.sqrt(step_size) * z
        return x, _watch(watch, k + 1, x)

    return jax.lax.fori_loop(0, n_steps, body, (x, _watch((jnp.int32(-1), jnp.int32(0)), 0, x)))


def langevin_sample(
    rng: Array, score_fn_at_data: Callable[[Array], Array], init: Array, n_steps: int, step_size: float
) -> tuple[Array, int]:
    """Unannealed Langevin x ← x + (α/2) ∇log p(x) + sqrt(α) z with the data score `score_fn_at_data(x)`.

    Returns `(samples, nfe = n_steps)`. For multimodal data it keeps the mode proportions of `init`:
    in the low-density regions between modes the score is negligible (the point of NCSN). A non-finite
    init or state raises `NonFiniteError` naming the step (module docstring).
    """
    if int(n_steps) != n_steps or n_steps < 1:
        raise ValueError(f"n_steps must be an integer >= 1; got {n_steps}")
    if not step_size > 0:
        raise ValueError(f"step_size must be > 0; got {step_size}")
    init = check_x("init", init)
    x, watch = _plain(rng, score_pytree(score_fn_at_data), init, int(n_steps), float(step_size))
    _raise_if_nonfinite("langevin_sample", watch, lambda k: "in init" if k == 0 else f"at step {k} of {int(n_steps)}",
                        int(init.shape[0]))
    return x, int(n_steps)
