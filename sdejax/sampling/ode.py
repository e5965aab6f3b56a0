"""Probability-flow ODE with diffrax: sampling (x_T → x_ε) and encoding (x_ε → x_T).

The probability-flow ODE of a forward SDE dx = f dt + g dw shares its marginals p_t:

    dx/dt = f(x, t) − ½ g(t)² ∇ log p_t(x).

It is solved with an adaptive diffrax solver (default Tsit5, PID step-size control). The whole
batch is one ODE state; the error norm is the largest per-example RMS, so `rtol`/`atol` hold for
every example whatever the batch size. This module also holds the diffrax helpers shared with
`sdejax.sampling.sde` and `sdejax.likelihood`: solver lookup, the error norm and NFE accounting.

NFE (score evaluations) is derived from diffrax's step statistics:

    NFE = init + stages_per_step · (accepted + rejected steps) [+ 1 for the Tweedie denoiser],

where for an explicit Runge–Kutta tableau with s stages, stages_per_step = s − 1 and init = 1 if
it is FSAL (Tsit5, Dopri5, Dopri8, Bosh3: the last stage of a step is the first of the next, also
after a rejected step, and is evaluated afresh only on the first step), else s and 0. The first step
is given explicitly (1% of the interval), so no evaluations go into choosing it (with dt0=None,
diffrax 0.7.2 skips its initial-step heuristic anyway, because `diffeqsolve` wraps every term in a
`WrapTerm`, and starts with 0.01).
`tests/test_ode_sde_samplers.py` checks this against a score function that counts its own calls.
"""
from __future__ import annotations

from typing import Callable

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

from sdejax.sde import SDE, ScoreFn, batch_broadcast

Array = jax.Array
SolverLike = diffrax.AbstractSolver | str | None

# Explicit Runge–Kutta solvers with an embedded error estimate (needed for adaptive steps).
ODE_SOLVERS: dict[str, type[diffrax.AbstractSolver]] = {
    "heun": diffrax.Heun,
    "midpoint": diffrax.Midpoint,
    "ralston": diffrax.Ralston,
    "bosh3": diffrax.Bosh3,
    "tsit5": diffrax.Tsit5,
    "dopri5": diffrax.Dopri5,
    "dopri8": diffrax.Dopri8,
}
MAX_STEPS = 16_384
FIRST_STEP = 0.01  # fraction of the time interval tried as the first step


def get_solver(solver: SolverLike, valid: dict[str, type], default: str) -> diffrax.AbstractSolver:
    """A diffrax solver from an instance, a name in `valid` (case-insensitive), or None (`default`)."""
    if solver is None:
        solver = default
    if isinstance(solver, str):
        key = solver.lower()
        if key not in valid:
            raise ValueError(f"unknown solver {solver!r}; valid names: {sorted(valid)} (or a diffrax solver instance)")
        return valid[key]()
    if not isinstance(solver, diffrax.AbstractSolver):
        raise ValueError(f"solver must be a name in {sorted(valid)} or a diffrax solver; got {solver!r}")
    return solver


def evaluations_per_step(solver: diffrax.AbstractSolver) -> tuple[int, int]:
    """(drift evaluations per attempted step, one-off evaluations) of `solver`.

    Explicit RK: s stages, FSAL ones reuse the last stage (s − 1 per step, 1 once); stochastic RK:
    one drift evaluation per stage; Euler / Euler–Heun: one. Other solvers (implicit ones, whose cost
    depends on Newton iterations) cannot be counted and are rejected.
    """
    if isinstance(solver, diffrax.AbstractERK):
        stages = len(solver.tableau.c) + 1
        return (stages - 1, 1) if solver.tableau.fsal else (stages, 0)
    if isinstance(solver, diffrax.AbstractSRK):
        return len(solver.tableau.b_sol), 0
    if isinstance(solver, (diffrax.Euler, diffrax.EulerHeun)):
        return 1, 0
    raise ValueError(
        f"cannot derive the number of score evaluations of {type(solver).__name__}; use an explicit "
        "Runge–Kutta (e.g. diffrax.Tsit5), stochastic Runge–Kutta (e.g. diffrax.ShARK), Euler or EulerHeun solver"
    )


def count_evaluations(solver: diffrax.AbstractSolver, stats: dict) -> Array:
    """Score evaluations of a finished solve: once + per_step · (accepted + rejected steps)."""
    per_step, once = evaluations_per_step(solver)
    steps = stats["num_accepted_steps"] + stats["num_rejected_steps"]
    return (once + per_step * steps).astype(jnp.int32)


def max_rms_norm(y) -> Array:
    """max over the batch of the per-example RMS of a pytree whose leaves share a leading batch axis."""
    leaves = jax.tree_util.tree_leaves(y)
    sq = sum(jnp.sum(jnp.reshape(jnp.abs(leaf) ** 2, (leaf.shape[0], -1)), axis=-1) for leaf in leaves)
    size = sum(int(np.prod(leaf.shape[1:])) for leaf in leaves)
    return jnp.sqrt(jnp.max(sq) / size)


def batch_time(t: Array, x: Array) -> Array:
    """A scalar solver time as the `(batch,)` time vector a score function expects."""
    return jnp.full(x.shape[:1], t, x.dtype)


def flow_drift(sde: SDE, score_fn: ScoreFn) -> Callable[[Array, Array], Array]:
    """The probability-flow drift (x, t) ↦ f(x, t) − ½ g(t)² s(x, t) with `t` of shape (batch,)."""
    reverse = sde.reverse(score_fn, probability_flow=True)
    return lambda x, t: reverse.sde(x, t)[0]


def solve_flow(
    sde: SDE, score_fn: ScoreFn, x: Array, t0: float, t1: float, solver: SolverLike, rtol: float, atol: float
) -> tuple[Array, Array]:
    """Integrate the probability-flow ODE from `x` at time t0 to t1 (either direction) -> (x_t1, nfe)."""
    solver = get_solver(solver, ODE_SOLVERS, "tsit5")
    drift = flow_drift(sde, score_fn)
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(lambda t, y, args: drift(y, batch_time(t, y))),
        solver,
        t0=t0,
        t1=t1,
        dt0=FIRST_STEP * (t1 - t0),
        y0=x,
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol, norm=max_rms_norm),
        max_steps=MAX_STEPS,
    )
    return sol.ys[-1], count_evaluations(solver, sol.stats)


def tweedie_denoise(sde: SDE, score_fn: ScoreFn, x: Array, t: float) -> Array:
    """E[x_0 | x_t] = (x_t + σ_t² ∇log p_t(x_t)) / α_t (Tweedie's formula; one score evaluation)."""
    tt = batch_time(t, x)
    alpha, sigma = sde.marginal_coeffs(tt)
    return (x + batch_broadcast(sigma**2, x) * score_fn(x, tt)) / batch_broadcast(alpha, x)


def _check_shape(name: str, x: Array, shape: tuple[int, ...]) -> None:
    if tuple(jnp.shape(x)) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}; got {jnp.shape(x)}")


def ode_sample(
    rng: Array,
    sde: SDE,
    score_fn: ScoreFn,
    shape: tuple[int, ...],
    solver: SolverLike = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    eps: float = 1e-3,
    denoise: bool = False,
    z: Array | None = None,
) -> tuple[Array, Array]:
    """Samples by solving the probability-flow ODE from x_T ~ prior (or the latent `z`) down to t = eps.

    With `denoise`, the result is the Tweedie estimate E[x_0 | x_eps] (one more score evaluation).
    Returns (samples of `shape`, nfe).
    """
    if z is None:
        z = sde.prior_sampling(rng, tuple(shape))
    _check_shape("z", z, shape)
    return _sample(sde, score_fn, z, solver, rtol, atol, eps, denoise)


@jax.jit(static_argnames=("sde", "score_fn", "solver", "denoise"))
def _sample(sde, score_fn, z, solver, rtol, atol, eps, denoise):
    x, nfe = solve_flow(sde, score_fn, z, sde.T, eps, solver, rtol, atol)
    if denoise:
        return tweedie_denoise(sde, score_fn, x, eps), nfe + 1
    return x, nfe


def ode_encode(
    sde: SDE,
    score_fn: ScoreFn,
    x: Array,
    solver: SolverLike = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    eps: float = 1e-3,
) -> tuple[Array, Array]:
    """Latents z = x_T of data `x` (taken at t = eps) by the forward probability flow; returns (z, nfe).

    `ode_sample(..., z=z, eps=eps)` inverts it up to the solver tolerance.
    """
    return _encode(sde, score_fn, x, solver, rtol, atol, eps)


@jax.jit(static_argnames=("sde", "score_fn", "solver"))
def _encode(sde, score_fn, x, solver, rtol, atol, eps):
    return solve_flow(sde, score_fn, x, eps, sde.T, solver, rtol, atol)
