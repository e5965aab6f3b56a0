"""Probability-flow ODE with diffrax: sampling (x_T → x_ε) and encoding (x_ε → x_T).

The probability-flow ODE of a forward SDE dx = f dt + g dw shares its marginals p_t:

    dx/dt = f(x, t) − ½ g(t)² ∇ log p_t(x).

By default it is solved with an adaptive diffrax solver (Tsit5, PID step-size control) whose error
norm is the largest per-example RMS, so `rtol`/`atol` hold for every example whatever the batch
size. With a grid `ts` (`sdejax.sampling.grids`) it takes one step of any explicit diffrax solver
between consecutive grid times (`StepTo`): NFE = stages per step · (n − 1) (+1 once for FSAL
solvers), see `sdejax.sampling.diffrax_utils`. `score_fn` enters the compiled solve as a pytree, so
new network parameters reuse it.
"""
from __future__ import annotations

import diffrax
import jax
import jax.numpy as jnp

from sdejax.sampling import grids
from sdejax.sampling.common import check_eps, initial_x
from sdejax.sampling.diffrax_utils import (
    GRID_ODE_SOLVERS, ODE_SOLVERS, Outcome, SolverLike, check_outcome, check_tolerances, count_evaluations,
    failed_as_nan, flow_drift, get_solver, outcome, step_control,
)
from sdejax.sampling.loop import batch_time, check_x, score_pytree
from sdejax.score import tweedie_x0
from sdejax.sde import SDE, ScoreFn

Array = jax.Array


def _solver(solver: SolverLike, ts) -> diffrax.AbstractSolver:
    return get_solver(solver, ODE_SOLVERS if ts is None else GRID_ODE_SOLVERS, "tsit5")


def _grid(sde: SDE, ts):
    """A user grid as a validated array of at least two times (one step), or None (adaptive)."""
    if ts is None:
        return None
    ts = grids.validate(sde, ts)
    if ts.size < 2:
        raise ValueError(f"ts must hold at least two times for an ODE solve; got {ts.size}")
    return jnp.asarray(ts)


def solve_flow(sde: SDE, score_fn: ScoreFn, x: Array, t0, t1, ts, solver, rtol, atol) -> tuple[Array, Array, Outcome]:
    """The probability-flow ODE from `x` at t0 to t1 (either direction), or along the grid `ts`
    (its own direction) -> (x at the end, nfe, outcome for `check_outcome`)."""
    drift = flow_drift(sde, score_fn)
    ts = None if ts is None else ts.astype(x.dtype)
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(lambda t, y, args: drift(y, batch_time(t, y))), solver, y0=x,
        **step_control(jnp.asarray(t0, x.dtype), jnp.asarray(t1, x.dtype), ts, rtol, atol),
    )
    result = outcome(sol, ts)
    return *failed_as_nan(result, sol.ys[-1]), count_evaluations(solver, sol.stats), result


def ode_sample(
    rng: Array,
    sde: SDE,
    score_fn: ScoreFn,
    shape: tuple[int, ...],
    solver: SolverLike = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    eps: float | None = None,
    denoise: bool = False,
    z: Array | None = None,
    *,
    ts=None,
    dtype=None,
) -> tuple[Array, Array]:
    """Samples by solving the probability-flow ODE from x_T ~ prior (or the latent `z`) down to t = eps.

    `eps` defaults to `sde.sampling_eps` (1e-3 for T = 1). `ts`: a descending grid of times (then
    fixed steps from ts[0] to ts[−1], `eps`, `rtol` and `atol` unused; `solver` may be any explicit
    diffrax solver, names: `GRID_ODE_SOLVERS`). With `denoise`, the result is the Tweedie estimate
    E[x_0 | x_end] (one more score evaluation). The prior is drawn in `dtype` (default float32; a
    given `z` keeps its own). Returns (samples of `shape`, nfe).
    """
    grid = _grid(sde, ts)
    eps = check_eps(sde, eps) if grid is None else float(grid[-1])
    rtol, atol = check_tolerances(rtol, atol)
    z = initial_x(sde, rng, shape, z, dtype, name="z")
    x, nfe, result = _sample(score_pytree(score_fn), z, eps, grid, rtol, atol,
                             sde=sde, solver=_solver(solver, ts), denoise=bool(denoise))
    check_outcome(result, "ode_sample", int(z.shape[0]), nfe)
    return x, nfe


@jax.jit(static_argnames=("sde", "solver", "denoise"))
def _sample(score_fn, z, eps, ts, rtol, atol, *, sde, solver, denoise):
    x, nfe, result = solve_flow(sde, score_fn, z, sde.T, eps, ts, solver, rtol, atol)
    if denoise:
        return tweedie_x0(sde, score_fn, x, batch_time(eps, x)), nfe + 1, result
    return x, nfe, result


def ode_encode(
    sde: SDE,
    score_fn: ScoreFn,
    x: Array,
    solver: SolverLike = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    eps: float | None = None,
    *,
    ts=None,
) -> tuple[Array, Array]:
    """Latents z = x_T of data `x` (taken at t = eps) by the forward probability flow; returns (z, nfe).

    With a grid `ts`, fixed steps along it in reverse (ts[−1] → ts[0]). `ode_sample(..., z=z, eps=eps)`
    (or the same `ts`) inverts it up to the solver error. Runs in the dtype of `x`.
    """
    x = check_x("x", x)
    grid = _grid(sde, ts)
    eps = check_eps(sde, eps) if grid is None else float(grid[-1])
    rtol, atol = check_tolerances(rtol, atol)
    z, nfe, result = _encode(score_pytree(score_fn), x, eps, None if grid is None else grid[::-1], rtol, atol,
                             sde=sde, solver=_solver(solver, ts))
    check_outcome(result, "ode_encode", int(x.shape[0]), nfe)
    return z, nfe


@jax.jit(static_argnames=("sde", "solver"))
def _encode(score_fn, x, eps, ts, rtol, atol, *, sde, solver):
    return solve_flow(sde, score_fn, x, eps, sde.T, ts, solver, rtol, atol)
