"""Diffrax plumbing shared by the probability-flow ODE, the reverse SDE and the likelihood.

Solver lookup (a name or an instance), step-size control (adaptive PID, or fixed steps on a grid
with `StepTo`), the per-example error norm, and the exact number of score evaluations (NFE):

    NFE = once + per_step · (accepted + rejected steps),

where for an explicit Runge–Kutta tableau with s stages, per_step = s − 1 and once = 1 if it is
FSAL (Tsit5, Dopri5, Dopri8, Bosh3: the last stage of a step is the first of the next, also after a
rejected step, and is evaluated afresh only on the first step), else s and 0; on a grid of n points
the steps are n − 1 and none is rejected. The first adaptive step is given explicitly (1% of the
interval), so no evaluations go into choosing it (with dt0=None, diffrax 0.7.2 skips its
initial-step heuristic anyway, because `diffeqsolve` wraps every term in a `WrapTerm`, and starts
with 0.01). The tests check this against a score function that counts its own calls.
"""
from __future__ import annotations

from typing import Callable

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

from sdejax.sampling.common import per_example_sum
from sdejax.sde import SDE, ScoreFn

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
# On a fixed grid no error estimate is needed: any explicit solver, Euler included.
GRID_ODE_SOLVERS = {**ODE_SOLVERS, "euler": diffrax.Euler}
MAX_STEPS = 16_384
FIRST_STEP = 0.01  # fraction of the time interval tried as the first adaptive step


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
    """max over the batch of the per-example RMS of a pytree whose leaves share a leading batch axis.

    As an error norm it makes `rtol`/`atol` hold for every example, whatever the batch size.
    """
    leaves = jax.tree_util.tree_leaves(y)
    sq = sum(per_example_sum(jnp.abs(leaf) ** 2) for leaf in leaves)
    size = sum(int(np.prod(leaf.shape[1:])) for leaf in leaves)
    return jnp.sqrt(jnp.max(sq) / size)


def step_control(t0, t1, ts: Array | None, rtol, atol, norm: Callable = max_rms_norm) -> dict:
    """`diffeqsolve` keyword arguments: adaptive PID steps from t0 to t1 (`ts` None), or one step
    between consecutive entries of the grid `ts` (from ts[0] to ts[−1]; t0, t1, rtol, atol unused)."""
    if ts is None:
        return dict(t0=t0, t1=t1, dt0=FIRST_STEP * (t1 - t0), max_steps=MAX_STEPS,
                    stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol, norm=norm))
    return dict(t0=ts[0], t1=ts[-1], dt0=None, max_steps=ts.shape[0] - 1, stepsize_controller=diffrax.StepTo(ts))


def flow_drift(sde: SDE, score_fn: ScoreFn) -> Callable[[Array, Array], Array]:
    """The probability-flow drift (x, t) ↦ f(x, t) − ½ g(t)² s(x, t) with `t` of shape (batch,)."""
    reverse = sde.reverse(score_fn, probability_flow=True)
    return lambda x, t: reverse.sde(x, t)[0]
