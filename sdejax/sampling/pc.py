"""Predictor–corrector sampling (Song et al., 2021, Alg. 1–5), generic over linear SDEs.

Time grid t_i = linspace(T, eps, N), N = sde.N (as the original). Starting from x ~ prior, for
i = 0 … N−1: a corrector at t_i, then (for i < N−1) a predictor from t_i to t_{i+1}. With `denoise`,
the output is Tweedie's x̂_0 = (x + σ² s(x, eps))/α at t = eps. Score evaluations:

    NFE = (N − 1)·[predictor ≠ none] + N·n_steps·[corrector ≠ none] + [denoise].

Predictors (one step t → s < t, z ~ N(0, I), reverse drift f̄ = f − g² s, halved for the ODE):
- `euler_maruyama`:     x_s = x + f̄(x, t)(s − t) + g(t) sqrt(t − s) z.
- `reverse_diffusion`:  x ← x − F + G² s(x, t) + G z with (F, G) = sde.discretize(x, t), the reverse of
  the SDE's own discrete chain (SMLD for VE, DDPM for VP); it steps one level of that chain.
- `ancestral_sampling`: x_s ~ q(x_s | x_t, x̂_0), the Gaussian posterior of the linear SDE, i.e. the
  DDIM step with η = 1 (η = 0, the deterministic DDIM, when `probability_flow`). For VE this is the
  original's ancestral step; for VP it has the original's mean (x + β s)/sqrt(1 − β) but the posterior
  variance β̃ = β σ_s²/σ_t² in place of β.
- `none`.
Correctors (n_steps steps of x ← x + ε s(x, t) + sqrt(2ε) z):
- `langevin`: ε = 2 a_t (snr ‖z‖/‖s(x, t)‖)², the norms taken per example (the original used batch
  means, which made a sample depend on its batch-mates). A step that depends on the example's own
  state and noise biases the chain by O(1/d): for Gaussian data in R^d its stationary covariance is
  τ(Σ + 2I/tr Σ⁻¹), τ = (d+2)/d — negligible for images, infinite variance at d = 2. Use `ald` for
  low-dimensional data.
- `ald`: ε = 2 a_t (snr σ_t)² (annealed Langevin dynamics).
- `none`.
a_t = (α_t / α_{t−T/N})² generalises the original's α_i = 1 − β_i (VP) and 1 (VE): for the DDPM chain
α_t²/α_{t−Δ}² = exp(−∫β) ≈ 1 − β_i, for VE it is 1, and it is defined for sub-VP too (the original crashed).
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from sdejax.sampling.ddim import Clip, check_clip, ddim_step, score_pytree, x0_estimate
from sdejax.sde import SDE, batch_broadcast

Array = jax.Array
ScoreFn = Callable[[Array, Array], Array]

PREDICTORS = ("euler_maruyama", "reverse_diffusion", "ancestral_sampling", "none")
CORRECTORS = ("langevin", "ald", "none")


def euler_maruyama_predictor(rng, sde: SDE, score_fn: ScoreFn, x, t, s, probability_flow=False) -> Array:
    """x_s = x + f̄(x, t)(s − t) + ḡ(t) sqrt(t − s) z for the reverse SDE (ḡ = 0 for the ODE)."""
    drift, diffusion = sde.reverse(score_fn, probability_flow).sde(x, t)
    dt = s - t
    z = jax.random.normal(rng, x.shape, x.dtype)
    return x + batch_broadcast(dt, x) * drift + batch_broadcast(diffusion * jnp.sqrt(-dt), x) * z


def reverse_diffusion_predictor(rng, sde: SDE, score_fn: ScoreFn, x, t, s, probability_flow=False) -> Array:
    """x ← x − F̄ + Ḡ z with (F̄, Ḡ) the reverse discretisation (F̄ = F − G² s, Ḡ = G; ODE: F − G² s/2, 0)."""
    del s  # the step is one level of the SDE's own discrete chain
    f, g = sde.reverse(score_fn, probability_flow).discretize(x, t)
    z = jax.random.normal(rng, x.shape, x.dtype)
    return x - f + batch_broadcast(g, x) * z


def ancestral_sampling_predictor(
    rng, sde: SDE, score_fn: ScoreFn, x, t, s, probability_flow=False, clip_x0: Clip = None
) -> Array:
    """x_s ~ q(x_s | x_t, x̂_0): the DDIM step with η = 1 (η = 0 for the probability-flow variant)."""
    x0 = x0_estimate(sde, score_fn, x, t, clip_x0)
    z = jax.random.normal(rng, x.shape, x.dtype)
    return ddim_step(sde, x, x0, t, s, 0.0 if probability_flow else 1.0, z)


def langevin_step_scale(sde: SDE, t: Array) -> Array:
    """a_t = (α_t / α_{max(t − T/N, 0)})²: the generic form of the original's α_i (1 − β_i, or 1 for VE)."""
    alpha, _ = sde.marginal_coeffs(t)
    prev, _ = sde.marginal_coeffs(jnp.maximum(t - sde.T / sde.N, 0.0))
    return (alpha / prev) ** 2


def _per_example_norm(v: Array) -> Array:
    return jnp.sqrt(jnp.sum(jnp.reshape(v, (v.shape[0], -1)) ** 2, axis=-1))


def langevin_corrector(
    rng, sde: SDE, score_fn: ScoreFn, x, t, snr: float | Array, n_steps: int, annealed: bool = False
) -> Array:
    """n_steps of x ← x + ε s(x, t) + sqrt(2ε) z, ε = 2 a_t (snr·r)² with r = ‖z‖/‖s‖ per example
    (Langevin, Alg. 4) or r = σ_t (annealed Langevin dynamics, Alg. 5 of Song et al.)."""
    scale = langevin_step_scale(sde, t)
    _, sigma = sde.marginal_coeffs(t)

    def body(i, x):
        score = score_fn(x, t)
        z = jax.random.normal(jax.random.fold_in(rng, i), x.shape, x.dtype)
        r = sigma if annealed else _per_example_norm(z) / _per_example_norm(score)
        step = batch_broadcast(2.0 * scale * (snr * r) ** 2, x)
        return x + step * score + jnp.sqrt(2.0 * step) * z

    return jax.lax.fori_loop(0, n_steps, body, x)


def _predictor(name, sde, score_fn, probability_flow, clip_x0):
    """The predictor `(rng, x, t, s) -> x_s` called `name`, or None for "none"."""
    fns = {
        "euler_maruyama": euler_maruyama_predictor,
        "reverse_diffusion": reverse_diffusion_predictor,
        "ancestral_sampling": functools.partial(ancestral_sampling_predictor, clip_x0=clip_x0),
    }
    if name == "none":
        return None
    fn = fns[name]
    return lambda rng, x, t, s: fn(rng, sde, score_fn, x, t, s, probability_flow=probability_flow)


def _corrector(name, sde, score_fn, snr, n_steps):
    """The corrector `(rng, x, t) -> x` called `name`, or None for "none"."""
    if name == "none":
        return None
    return lambda rng, x, t: langevin_corrector(rng, sde, score_fn, x, t, snr, n_steps, annealed=name == "ald")


@functools.partial(
    jax.jit,
    static_argnames=("sde", "shape", "predictor", "corrector", "n_steps", "probability_flow", "denoise", "clip_x0"),
)
def _pc(rng, score_fn, snr, eps, *, sde, shape, predictor, corrector, n_steps, probability_flow, denoise, clip_x0):
    predict = _predictor(predictor, sde, score_fn, probability_flow, clip_x0)
    correct = _corrector(corrector, sde, score_fn, snr, n_steps)
    prior_rng, rng = jax.random.split(rng)
    x = sde.prior_sampling(prior_rng, shape)
    ts = jnp.linspace(sde.T, eps, sde.N)
    ones = jnp.ones(shape[:1], x.dtype)

    def body(i, x):
        c_rng, p_rng = jax.random.split(jax.random.fold_in(rng, i))
        t = ts[i] * ones
        if correct is not None:
            x = correct(c_rng, x, t)
        if predict is not None:
            s = ts[jnp.minimum(i + 1, sde.N - 1)] * ones
            x = jax.lax.cond(i < sde.N - 1, lambda x: predict(p_rng, x, t, s), lambda x: x, x)
        return x

    x = jax.lax.fori_loop(0, sde.N, body, x)
    return x0_estimate(sde, score_fn, x, ts[-1] * ones, clip_x0) if denoise else x


def _check_name(kind: str, name: str, valid: tuple[str, ...]) -> None:
    if name not in valid:
        raise ValueError(f"unknown {kind} {name!r}; valid: {list(valid)}")


def pc_nfe(n: int, predictor: str, corrector: str, n_steps: int = 1, denoise: bool = True) -> int:
    """Score evaluations of `pc_sample` on an N-point grid (module docstring)."""
    return (n - 1) * (predictor != "none") + n * n_steps * (corrector != "none") + int(denoise)


def pc_sample(
    rng: Array,
    sde: SDE,
    score_fn: ScoreFn,
    shape: tuple[int, ...],
    predictor: str = "reverse_diffusion",
    corrector: str = "langevin",
    snr: float = 0.16,
    n_steps: int = 1,
    probability_flow: bool = False,
    denoise: bool = True,
    eps: float = 1e-3,
    clip_x0: Clip = None,
) -> tuple[Array, int]:
    """Predictor–corrector sampling (module docstring); returns `(samples, nfe)`.

    `clip_x0=(lo, hi)` clips the x̂_0 estimates (ancestral steps and the final denoising) to the data
    range. `score_fn` may be a `jax.tree_util.Partial` whose arguments are traced (see `score_pytree`).
    """
    _check_name("predictor", predictor, PREDICTORS)
    _check_name("corrector", corrector, CORRECTORS)
    if predictor == "none" and corrector == "none":
        raise ValueError("predictor and corrector cannot both be 'none'")
    if sde.N < 2:
        raise ValueError(f"pc_sample needs sde.N >= 2 grid points; got N={sde.N}")
    if int(n_steps) != n_steps or n_steps < 1:
        raise ValueError(f"n_steps must be an integer >= 1; got {n_steps}")
    if not 0.0 < eps < sde.T:
        raise ValueError(f"eps must be in (0, T={sde.T}); got {eps}")
    samples = _pc(
        rng, score_pytree(score_fn), float(snr), float(eps),
        sde=sde, shape=tuple(shape), predictor=predictor, corrector=corrector, n_steps=int(n_steps),
        probability_flow=bool(probability_flow), denoise=bool(denoise), clip_x0=check_clip(clip_x0),
    )
    return samples, pc_nfe(sde.N, predictor, corrector, n_steps, denoise)
