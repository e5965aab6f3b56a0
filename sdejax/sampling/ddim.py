"""DDIM (Song, Meng & Ermon, 2021) for any linear SDE x_t = α_t x_0 + σ_t z, as a solver of the loop.

Between grid times s < t, with x̂_0 the Tweedie estimate at (x_t, t) and ε̂ = (x_t − α_t x̂_0)/σ_t,

    x_s = α_s x̂_0 + sqrt(σ_s² − c²) ε̂ + c z,   c = η σ̃,   σ̃² = σ_s² (1 − α_t² σ_s² / (α_s² σ_t²)).

σ̃² is the variance of the Gaussian posterior q(x_s | x_t, x_0) of the SDE (whose transition x_s → x_t
has mean α_t/α_s x_s and variance σ_t² − (α_t/α_s)² σ_s²), so η = 0 is the deterministic DDIM and
η = 1 draws from q(x_s | x_t, x̂_0): DDPM ancestral sampling with the posterior variance β̃.
Thresholding x̂_0 is a score transform (`sdejax.guidance.threshold`): ε̂ then follows from the
thresholded x̂_0 (as Imagen does; diffusers' DDIM with `clip_sample` keeps the model's own ε instead).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from sdejax.sampling.common import check_int, initial_x, time_grid
from sdejax.sampling.loop import Callback, Constraint, batch_time, sample_loop
from sdejax.score import tweedie_x0
from sdejax.sde import SDE, ScoreFn, batch_broadcast

Array = jax.Array


def ddim_step(sde: SDE, x: Array, x0: Array, t: Array, s: Array, eta: float | Array, z: Array) -> Array:
    """One DDIM step from time t to s < t given x̂_0 (module docstring): returns x_s."""
    a_t, s_t = (batch_broadcast(v, x) for v in sde.marginal_coeffs(t))
    a_s, s_s = (batch_broadcast(v, x) for v in sde.marginal_coeffs(s))
    ratio = (a_t * s_s) / (a_s * s_t)
    c = eta * s_s * jnp.sqrt(jnp.maximum(1.0 - ratio**2, 0.0))
    k = jnp.sqrt(jnp.maximum(s_s**2 - c**2, 0.0))
    # α_s x̂0 + k (x − α_t x̂0)/σ_t, grouped so that no difference of near-equal terms is formed.
    return (k / s_t) * x + (a_s - k * a_t / s_t) * x0 + c * z


@dataclasses.dataclass(frozen=True)
class DDIM:
    """The DDIM solver for `sample_loop`: one score evaluation per step; `final` is x̂_0 at t_{n−1}.

    NFE = (n − 1) + [denoise].
    """

    eta: float = 0.0

    def init(self, sde: SDE, score_fn: ScoreFn, x: Array, ts: Array) -> None:
        return None

    def step(self, sde: SDE, score_fn: ScoreFn, rng: Array, state, x: Array, i: Array, ts: Array):
        t, s = batch_time(ts[i], x), batch_time(ts[i + 1], x)
        x0 = tweedie_x0(sde, score_fn, x, t)
        z = jax.random.normal(rng, x.shape, x.dtype)
        return ddim_step(sde, x, x0, t, s, self.eta, z), state

    def final(self, sde: SDE, score_fn: ScoreFn, rng: Array, state, x: Array, ts: Array, denoise: bool) -> Array:
        return tweedie_x0(sde, score_fn, x, batch_time(ts[-1], x)) if denoise else x

    def nfe(self, n: int, denoise: bool) -> int:
        return n - 1 + int(denoise)


def ddim_sample(
    rng: Array,
    sde: SDE,
    score_fn: ScoreFn,
    shape: tuple[int, ...],
    num_steps: int | None = None,
    eta: float = 0.0,
    eps: float | None = None,
    *,
    ts=None,
    x_T: Array | None = None,
    denoise: bool = True,
    trajectory: bool = False,
    callback: Callback | None = None,
    constraint: Constraint | None = None,
    resample: tuple[int, int] | None = None,
    dtype=None,
):
    """DDIM sampling on a grid (default t_i = linspace(T, eps, num_steps)); returns `(samples, nfe)`,
    or `(samples, xs, nfe)` with `trajectory` (see `sample_loop`).

    n − 1 DDIM steps t_i → t_{i+1} on the n-point grid, then with `denoise` the output is x̂_0 at
    t_{n−1} (the Tweedie denoising, as `pc_sample(denoise=True)`; it is also the last step of DDIM,
    whose final time has α = 1, σ = 0); without, x at t_{n−1}. NFE = n − 1 + [denoise]. `eta` ∈ [0, 1]:
    0 deterministic, 1 DDPM with posterior variance (thresholding x̂_0: module docstring). `ts`: any grid (then `num_steps`, if given, must be its length,
    and `eps` is unused). `x_T`: the initial state (default: a prior draw with the first half of
    `split(rng)`, in `dtype`, default float32). `eps` defaults to `sde.sampling_eps`.
    """
    if num_steps is None and ts is None:
        raise ValueError("ddim_sample needs num_steps (grid points of the default grid) or a grid ts")
    if num_steps is not None:
        num_steps = check_int("num_steps", num_steps, 2)
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1]; got {eta}")
    grid = time_grid(sde, ts, num_steps, eps)
    if num_steps is not None and grid.size != num_steps:
        raise ValueError(f"num_steps = {num_steps} does not match the length {grid.size} of ts")
    prior_rng, rng = jax.random.split(rng)
    x = initial_x(sde, prior_rng, shape, x_T, dtype)
    solver = DDIM(float(eta))
    return sample_loop(solver, sde, score_fn, rng, x, grid, denoise, trajectory, callback, constraint, resample)
