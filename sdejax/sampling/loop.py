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

Non-finite values are watched at no extra score evaluation: the scan carries the first state index k
(0: x_T, i + 1: after step i, n: the output) at which some example is non-finite and how many are,
and `sample_loop` raises `NonFiniteError` naming the step, its times and the count (one isfinite
reduction of the state per step; a NaN score makes its examples' state NaN, so this catches it).
Inside the caller's own jit nothing can be raised: the NaN stays in the samples.

`score_fn` enters the compiled program as a pytree (`score_pytree`): a `jax.tree_util.Partial`
whose arguments are network parameters reuses the program for new parameters.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
from jax.tree_util import Partial

from sdejax.sde import SDE, ScoreFn, batch_broadcast

Array = jax.Array
Callback = Callable[[int, Array, Array], None]
Watch = tuple[Array, Array]  # (first state index with a non-finite example or −1, how many there)


class NonFiniteError(FloatingPointError):
    """A sampler or the likelihood met a non-finite score or state (the message says where, how many)."""


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


def check_batch_axis(name: str, shape: tuple[int, ...]) -> None:
    """A ValueError naming `name` unless `shape` has a non-empty leading batch axis."""
    if len(shape) < 1 or shape[0] < 1:
        raise ValueError(f"{name} must have a non-empty leading batch axis; got shape {tuple(shape)}")


def check_x(name: str, x: Array, shape: tuple[int, ...] | None = None) -> Array:
    """`x` as a floating array with a leading batch axis (and of `shape` when given), else a ValueError naming it."""
    x = jnp.asarray(x)
    check_batch_axis(name, x.shape)
    if shape is not None and tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}; got {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must be a floating array; got dtype {x.dtype}")
    return x


def nonfinite_examples(y) -> Array:
    """(batch,) bool: which examples hold a non-finite value in any leaf of `y` (leading batch axes)."""
    leaves = jax.tree_util.tree_leaves(y)
    flags = [jnp.any(~jnp.isfinite(jnp.reshape(leaf, (leaf.shape[0], -1))), axis=-1) for leaf in leaves]
    return functools.reduce(jnp.logical_or, flags)


def _watch(watch: Watch, k, x: Array) -> Watch:
    """`watch` updated with state index k: the first index with a non-finite example is kept."""
    count = jnp.sum(nonfinite_examples(x), dtype=jnp.int32)
    first = (watch[0] < 0) & (count > 0)
    return jnp.where(first, jnp.asarray(k, jnp.int32), watch[0]), jnp.where(first, count, watch[1])


def is_traced(tree) -> bool:
    """Whether `tree` holds tracers (a sampler called inside the caller's own jit: nothing can be raised)."""
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(tree))


def _raise_nonfinite(watch: Watch, ts, batch: int) -> None:
    """`NonFiniteError` naming the step, its times and the count of `_run`'s watch, if it saw any
    (not under the caller's jit, where the NaN stays in the samples)."""
    if is_traced(watch):
        return
    k, count = (int(v) for v in jax.device_get(watch))
    if k < 0:
        return
    ts, n = [float(t) for t in jax.device_get(ts)], int(ts.shape[0])
    if k == 0:
        where = "in x_T"
    elif k < n:
        where = f"at step {k} of {n - 1} (t = {ts[k - 1]:.4g} -> {ts[k]:.4g})"
    else:
        where = f"in the final step (from t = {ts[-1]:.4g})"
    raise NonFiniteError(f"non-finite score or state {where} in {count} of {batch} examples")


def _emit(callback: Callback, i, t, x) -> None:
    callback(int(i), t, x)


def renoise(sde: SDE, rng: Array, x: Array, t: Array, s: Array) -> Array:
    """A draw of x_s ~ q(x_s | x_t) for s > t (the forward transition of a linear SDE):
    x_s = (α_s/α_t) x_t + sqrt(σ_s² − (α_s/α_t)² σ_t²) z."""
    a_t, s_t = sde.marginal_coeffs(t)
    a_s, s_s = sde.marginal_coeffs(s)
    r = a_s / a_t
    std = jnp.sqrt(jnp.maximum(s_s**2 - (r * s_t) ** 2, 0.0))
    z = jax.random.normal(rng, x.shape, x.dtype)
    return batch_broadcast(r, x) * x + batch_broadcast(std, x) * z


def _down(solver, sde, score_fn, constraint, key, state, x, i, ts):
    """Step i (t_i → t_{i+1}), then the constraint's known part at t_{i+1} (`Constraint.project`)."""
    if constraint is None:
        return solver.step(sde, score_fn, key, state, x, i, ts)
    step_key, project_key = jax.random.split(key)
    x, state = solver.step(sde, score_fn, step_key, state, x, i, ts)
    return constraint.project(sde, project_key, x, batch_time(ts[i + 1], x)), state


@functools.partial(jax.jit, static_argnames=("solver", "sde", "denoise", "trajectory", "callback"))
def _run(score_fn, rng, x, ts, constraint, moves, *, solver, sde, denoise, trajectory, callback):
    ts = ts.astype(x.dtype)
    n_moves = ts.shape[0] - 1 if moves is None else moves[0].shape[0]
    if constraint is not None:
        x = constraint.project(sde, jax.random.fold_in(jax.random.fold_in(rng, n_moves), 1), x, batch_time(ts[0], x))
    state = solver.init(sde, score_fn, x, ts)
    watch = _watch((jnp.int32(-1), jnp.int32(0)), 0, x)

    def body(carry, move):
        x, state, watch = carry
        k, i, up = move
        key = jax.random.fold_in(rng, k)
        if moves is None:
            x, state = _down(solver, sde, score_fn, constraint, key, state, x, i, ts)
        else:  # RePaint: an up move re-noises t_{i+1} → t_i (its state is unchanged), a down move steps
            x, state = jax.lax.cond(
                up.astype(bool), lambda x, state: (renoise(sde, key, x, batch_time(ts[i + 1], x), batch_time(ts[i], x)), state),
                lambda x, state: _down(solver, sde, score_fn, constraint, key, state, x, i, ts), x, state)
        index = i + 1 - up
        if callback is not None:
            jax.debug.callback(functools.partial(_emit, callback), index, ts[index], x, ordered=True)
        return (x, state, _watch(watch, index, x)), (x if trajectory else None)

    if n_moves > 0:
        steps = jnp.arange(ts.shape[0] - 1)
        xs_moves = (steps, steps, jnp.zeros_like(steps)) if moves is None else (jnp.arange(n_moves), *moves)
        (x, state, watch), xs = jax.lax.scan(body, (x, state, watch), xs_moves)
    else:  # no step: `step` is never traced (a solver's per-step arrays would be empty)
        xs = jnp.zeros((0, *x.shape), x.dtype) if trajectory else None
    out = solver.final(sde, score_fn, jax.random.fold_in(rng, n_moves), state, x, ts, denoise)
    if constraint is not None:
        out = constraint.final(out)
    return out, xs, _watch(watch, ts.shape[0], out)


class Constraint(Protocol):
    """Known data imposed on the state (`sdejax.sampling.inverse`): a pytree whose arrays are traced."""

    def project(self, sde: SDE, rng: Array, x: Array, t: Array) -> Array: ...

    def final(self, x: Array) -> Array: ...


def resampling_moves(n: int, jump: int, resample: int) -> tuple[Array, Array]:
    """RePaint's walk on an n-point grid as (step index i, up) moves: down t_i → t_{i+1} by the solver;
    after every `jump` down steps (where `jump` more remain above), `resample − 1` times: `jump` up
    moves (re-noising back to where the block began) and the block's `jump` down steps again."""
    if jump < 1 or resample < 1:
        raise ValueError(f"RePaint needs jump >= 1 and resample >= 1; got jump={jump}, resample={resample}")
    idx, up = [], []
    for start in range(0, n - 1, jump):
        block = list(range(start, min(start + jump, n - 1)))
        for r in range(resample):
            idx += block
            up += [0] * len(block)
            if r < resample - 1:
                idx += block[::-1]
                up += [1] * len(block)
    return jnp.asarray(idx, jnp.int32), jnp.asarray(up, jnp.int32)


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
    constraint: Constraint | None = None,
    resample: tuple[int, int] | None = None,
):
    """Run `solver` on the grid `ts` from `x_T`; returns `(samples, nfe)`, or `(samples, xs, nfe)` with
    `trajectory` (xs[k] is the state after move k; without `resample` the state at ts[k + 1], shape
    `(n − 1, *x_T.shape)`).

    `callback(i, t_i, x_i)` is called on the host after every step (i = 1 … n−1). Everything runs in
    the dtype of `x_T`. A non-finite x_T, state or output raises `NonFiniteError` (module docstring).
    `constraint` (`sdejax.sampling.inverse`) imposes known data: its part of x_T and of every step's
    state is replaced by the data perturbed to that time, and of the output by the data itself.
    `resample = (jump, r)`: RePaint's resampling (`resampling_moves`); one-step solvers only.
    """
    x_T = check_x("x_T", x_T)
    ts = jnp.asarray(ts)
    if ts.ndim != 1 or ts.shape[0] < 1:
        raise ValueError(f"ts must be a 1-D grid of at least one time; got shape {ts.shape}")
    n = int(ts.shape[0])
    moves = None
    if resample is not None:
        if getattr(solver, "multistep", False):
            raise ValueError(f"RePaint resampling re-noises the state, which a multistep solver's history cannot "
                             f"follow; use a one-step solver (pc, ddim, euler, heun), not {type(solver).__name__}")
        moves = resampling_moves(n, *resample)
    out, xs, watch = _run(score_pytree(score_fn), rng, x_T, ts, constraint, moves, solver=solver, sde=sde,
                          denoise=bool(denoise), trajectory=bool(trajectory), callback=callback)
    _raise_nonfinite(watch, ts, int(x_T.shape[0]))
    nfe = solver.nfe(n, bool(denoise))
    if moves is not None:  # each extra down move costs one step's evaluations
        extra = int(jnp.sum(1 - moves[1])) - (n - 1)
        nfe += extra * (solver.nfe(3, False) - solver.nfe(2, False))
    return (out, xs, nfe) if trajectory else (out, nfe)
