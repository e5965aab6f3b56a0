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

A non-finite score stops the solve at once instead of running to MAX_STEPS (left alone, diffrax
rejects the NaN step, shrinks it until t + dt rounds to t, and spins there): adaptive solves use
`StopAtNonFinite`, a PID controller that ends the solve at the first step whose candidate state is
non-finite (counting its non-finite examples), and fixed steps an event that ends it at the first
non-finite state. Solves run with `throw=False`; `check_outcome` raises on the host
(`NonFiniteError` with the time, the number of examples and the evaluations spent, or the solver's
own failure). Inside the caller's own jit nothing can be raised: `failed_as_nan` makes the outputs
of a failed solve NaN. A finite solve is unchanged: same steps, same results, bit for bit.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

from sdejax.sampling.common import check_number, per_example_sum
from sdejax.sampling.loop import NonFiniteError, is_traced, nonfinite_examples
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
Outcome = tuple[Array, Array, Array, Array]  # (diffrax result code, last step's start and end, non-finite examples)


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


def check_tolerances(rtol: float, atol: float) -> tuple[float, float]:
    """`rtol`, `atol` as finite floats ≥ 0, else a ValueError naming the bad one."""
    return check_number("rtol", rtol), check_number("atol", atol)


def nonfinite_event(t, y, args, **kwargs) -> Array:
    """Event condition: some value of the state `y` is non-finite (ends the solve at that step)."""
    return jnp.any(nonfinite_examples(y))


class Stopped(NamedTuple):
    """`StopAtNonFinite`'s state: the PID state, the last step tried (t0 → t1), its non-finite examples."""

    pid: Any
    t0: Array
    t1: Array
    count: Array


class StopAtNonFinite(diffrax.PIDController):
    """A PID controller that ends the solve (as `RESULTS.event_occurred`) at the first step whose
    candidate state is non-finite; its state keeps how many examples were (module docstring)."""

    def init(self, terms, t0, t1, y0, dt0, args, func, error_order):
        next_t1, pid = super().init(terms, t0, t1, y0, dt0, args, func, error_order)
        return next_t1, Stopped(pid, jnp.asarray(t0), jnp.asarray(next_t1), jnp.zeros((), jnp.int32))

    def adapt_step_size(self, t0, t1, y0, y1_candidate, args, y_error, error_order, controller_state):
        keep, next_t0, next_t1, jump, pid, result = super().adapt_step_size(
            t0, t1, y0, y1_candidate, args, y_error, error_order, controller_state.pid)
        count = jnp.sum(nonfinite_examples(y1_candidate), dtype=jnp.int32)
        result = diffrax.RESULTS.where(count > 0, diffrax.RESULTS.event_occurred, result)
        return keep, next_t0, next_t1, jump, Stopped(pid, jnp.asarray(t0), jnp.asarray(t1), count), result


def step_control(t0, t1, ts: Array | None, rtol, atol, norm: Callable = max_rms_norm) -> dict:
    """`diffeqsolve` keyword arguments: adaptive PID steps from t0 to t1 (`ts` None), or one step
    between consecutive entries of the grid `ts` (from ts[0] to ts[−1]; t0, t1, rtol, atol unused);
    both stop at a non-finite state (module docstring; check the solution with `check_outcome`)."""
    if ts is None:
        return dict(t0=t0, t1=t1, dt0=FIRST_STEP * (t1 - t0), max_steps=MAX_STEPS, throw=False,
                    stepsize_controller=StopAtNonFinite(rtol=rtol, atol=atol, norm=norm),
                    saveat=diffrax.SaveAt(t1=True, controller_state=True))
    return dict(t0=ts[0], t1=ts[-1], dt0=None, max_steps=ts.shape[0] - 1, throw=False,
                stepsize_controller=diffrax.StepTo(ts), event=diffrax.Event(nonfinite_event))


def outcome(sol: diffrax.Solution, ts: Array | None = None, time: Callable = lambda t: t) -> Outcome:
    """The `Outcome` of a solve run with `step_control` (the grid `ts` it was given, if any); `time`
    maps the solver's time to the caller's."""
    if ts is None:  # the controller sees diffrax's internal time, negated for a backward solve
        state, sign = sol.controller_state, jnp.where(sol.t1 >= sol.t0, 1, -1)
        return sol.result._value, time(sign * state.t0), time(sign * state.t1), state.count
    k = sol.stats["num_accepted_steps"]  # an event ends the solve at the state after step k (ts[k−1] → ts[k])
    last = jax.tree_util.tree_map(lambda leaf: leaf[-1], sol.ys)
    span = ts[jnp.maximum(k - 1, 0)], ts[k]
    return sol.result._value, time(span[0]), time(span[1]), jnp.sum(nonfinite_examples(last), dtype=jnp.int32)


def failed_as_nan(result: Outcome, *outputs: Array) -> tuple[Array, ...]:
    """`outputs`, or NaN where the solve of `result` did not succeed (it stopped early)."""
    ok = result[0] == diffrax.RESULTS.successful._value.item()
    return tuple(jnp.where(ok, out, jnp.nan) for out in outputs)


def check_outcome(result: Outcome, what: str, batch: int, nfe: Array) -> None:
    """Raise unless the solve succeeded: `NonFiniteError` (time, examples, evaluations spent) for a
    non-finite state, else a RuntimeError with diffrax's message; `what` names the caller. Under the
    caller's jit it cannot raise (`failed_as_nan`)."""
    if is_traced(result):
        return
    code, t0, t1, count = (v.item() for v in jax.device_get(result))
    if code == diffrax.RESULTS.successful._value.item():
        return
    if code == diffrax.RESULTS.event_occurred._value.item():
        raise NonFiniteError(f"{what}: non-finite score or state in the step t = {t0:.4g} -> {t1:.4g} in {count} "
                             f"of {batch} examples (stopped after {int(nfe)} score evaluations)")
    raise RuntimeError(f"{what} failed in the step t = {t0:.4g} -> {t1:.4g}: {diffrax.RESULTS._index_to_message[code]}")


def flow_drift(sde: SDE, score_fn: ScoreFn) -> Callable[[Array, Array], Array]:
    """The probability-flow drift (x, t) ↦ f(x, t) − ½ g(t)² s(x, t) with `t` of shape (batch,)."""
    reverse = sde.reverse(score_fn, probability_flow=True)
    return lambda x, t: reverse.sde(x, t)[0]
