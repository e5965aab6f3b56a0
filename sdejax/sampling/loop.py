"""The one fixed-step loop: any solver on any time grid, from an `x_T` the caller may own.

A grid is a descending array of times t_0 > t_1 > … > t_{n−1} (`sdejax.sampling.grids`). A solver is
a small hashable object (a frozen dataclass: its options are its fields) with the init/step shape of
diffrax solvers and optax transformations:

    state = solver.init(sde, score_fn, x_T, ts)
    x, state = solver.step(sde, score_fn, rng_i, state, x, i, ts)     # t_i → t_{i+1}, i = 0 … n−2
    x = solver.final(sde, score_fn, rng, state, x, ts, denoise)      # at t_{n−1}

`i` is traced (the steps run in one `lax.scan`); `ts` has a static length. `final` is where the
step to σ = 0 lives: with `denoise` it returns x̂₀ at t_{n−1} (the first-order step to σ = 0, one
score evaluation), chosen statically so no higher-order formula ever sees λ = ∞. `solver.nfe(n,
denoise)` is the exact number of score evaluations. Keys: step i uses fold_in(rng, i), the final
step fold_in(rng, n − 1).

`score_fn` enters the compiled program as a pytree (`score_pytree`): a `jax.tree_util.Partial`
whose arguments are network parameters reuses the program for new parameters.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
from jax.tree_util import Partial

from sdejax.sde import SDE, ScoreFn

Array = jax.Array
Callback = Callable[[int, Array, Array], None]


class Solver(Protocol):
    """What `sample_loop` needs of a fixed-step solver (module docstring)."""

    def init(self, sde: SDE, score_fn: ScoreFn, x: Array, ts: Array) -> Any: ...

    def step(self, sde: SDE, score_fn: ScoreFn, rng: Array, state: Any, x: Array, i: Array, ts: Array) -> tuple[Array, Any]: ...

    def final(self, sde: SDE, score_fn: ScoreFn, rng: Array, state: Any, x: Array, ts: Array, denoise: bool) -> Array: ...

    def nfe(self, n: int, denoise: bool) -> int: ...


def score_pytree(score_fn: ScoreFn) -> Partial:
    """`score_fn` as a pytree, so jitted samplers take it as an argument.

    A `jax.tree_util.Partial(fn, params, ...)` is kept as is: its arguments (e.g. network parameters)
    are traced, so new parameters reuse the compiled sampler. Any other callable is wrapped as
    `Partial(score_fn)` and compiled once per function object.
    """
    return score_fn if isinstance(score_fn, Partial) else Partial(score_fn)


def batch_time(t: Array, x: Array) -> Array:
    """A scalar time as the `(batch,)` time vector a score function expects, in the dtype of `x`."""
    return jnp.full(x.shape[:1], t, x.dtype)


def check_x(name: str, x: Array, shape: tuple[int, ...] | None = None) -> Array:
    """`x` as a floating array with a leading batch axis (and of `shape` when given), else a ValueError naming it."""
    x = jnp.asarray(x)
    if x.ndim < 1 or x.shape[0] < 1:
        raise ValueError(f"{name} must have a non-empty leading batch axis; got shape {x.shape}")
    if shape is not None and tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}; got {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must be a floating array; got dtype {x.dtype}")
    return x


def _emit(callback: Callback, i, t, x) -> None:
    callback(int(i), t, x)


@functools.partial(jax.jit, static_argnames=("solver", "sde", "denoise", "trajectory", "callback"))
def _run(score_fn, rng, x, ts, *, solver, sde, denoise, trajectory, callback):
    ts = ts.astype(x.dtype)
    state = solver.init(sde, score_fn, x, ts)

    def body(carry, i):
        x, state = carry
        x, state = solver.step(sde, score_fn, jax.random.fold_in(rng, i), state, x, i, ts)
        if callback is not None:
            jax.debug.callback(functools.partial(_emit, callback), i + 1, ts[i + 1], x, ordered=True)
        return (x, state), (x if trajectory else None)

    if ts.shape[0] > 1:
        (x, state), xs = jax.lax.scan(body, (x, state), jnp.arange(ts.shape[0] - 1))
    else:  # no step: `step` is never traced (a solver's per-step arrays would be empty)
        xs = jnp.zeros((0, *x.shape), x.dtype) if trajectory else None
    out = solver.final(sde, score_fn, jax.random.fold_in(rng, ts.shape[0] - 1), state, x, ts, denoise)
    return (out, xs) if trajectory else out


def sample_loop(
    solver: Solver,
    sde: SDE,
    score_fn: ScoreFn,
    rng: Array,
    x_T: Array,
    ts: Array,
    denoise: bool = True,
    trajectory: bool = False,
    callback: Callback | None = None,
):
    """Run `solver` on the grid `ts` from `x_T`; returns `(samples, nfe)`, or `(samples, xs, nfe)` with
    `trajectory` (xs[k] is the state at ts[k + 1], shape `(n − 1, *x_T.shape)`).

    `callback(i, t_i, x_i)` is called on the host after every step (i = 1 … n−1). Everything runs in
    the dtype of `x_T`.
    """
    x_T = check_x("x_T", x_T)
    ts = jnp.asarray(ts)
    if ts.ndim != 1 or ts.shape[0] < 1:
        raise ValueError(f"ts must be a 1-D grid of at least one time; got shape {ts.shape}")
    out = _run(score_pytree(score_fn), rng, x_T, ts, solver=solver, sde=sde, denoise=bool(denoise),
               trajectory=bool(trajectory), callback=callback)
    nfe = solver.nfe(int(ts.shape[0]), bool(denoise))
    return (*out, nfe) if trajectory else (out, nfe)
