"""Pure step functions: `train_step(state, batch) -> (state, metrics)`, its `lax.scan` over a
stack of batches (several steps per dispatch), and `eval_step(params, rng, batch, context) -> loss`.
Both call an objective `objective(params, rng, batch, context)` (`sdejax.training.objective`); the
train step builds the context (step, EMA and target params, teacher params) from the state it is given.

Loops over steps and gradient-accumulation microbatches are `lax.scan`s, or with `unroll=True`
Python loops traced into one program (the same maths): XLA:CPU runs convolution gradients ~25x
slower inside a loop body (jax-ml/jax#12868; measured 50 s vs 1.9 s for a DDPM++ digits step), so
the training loop unrolls on CPU, at the price of a compile time that grows with the length.

A step is a function of (state, batch) only. Device placement wraps it unchanged
(`sdejax.training.parallel`): under `jax.jit` with a sharded batch the step is global SPMD code;
under `pmap` it sees its device's rows and averages gradients over `axis_name`. Either way every
example gets its global index in the step's batch (`batch["index"]`), from which the loss folds
its per-example noise, so the random draws do not depend on the device count or on gradient
accumulation (microbatch m holds the rows i with i mod A = m).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

from sdejax.training.objective import Context, Objective, context_from_state
from sdejax.training.state import TrainState, ema_decay, ema_update

Array = jax.Array


def _global_index(n: int, axis_name: Optional[str]) -> Array:
    """Global row indices of this shard: 0..n−1 under jit; d·n + 0..n−1 on pmap device d."""
    local = jnp.arange(n)
    return local if axis_name is None else jax.lax.axis_index(axis_name) * n + local


def _microbatches(batch: dict, accum: int) -> dict:
    """(n, ...) -> (accum, n/accum, ...), microbatch m = rows m, m + A, m + 2A, … (keeps a sharded
    leading axis sharded: each device's block of rows splits locally)."""
    def split(v):
        return jnp.moveaxis(v.reshape((v.shape[0] // accum, accum) + v.shape[1:]), 1, 0)
    return jax.tree_util.tree_map(split, batch)


def scan(body: Callable, carry: Any, xs: Any, unroll: bool = False) -> tuple[Any, Any]:
    """`jax.lax.scan(body, carry, xs)`, or with `unroll` a Python loop over the leading axis of `xs`
    (outputs stacked the same way)."""
    if not unroll:
        return jax.lax.scan(body, carry, xs)
    outputs = []
    for i in range(jax.tree_util.tree_leaves(xs)[0].shape[0]):
        carry, out = body(carry, jax.tree_util.tree_map(lambda v: v[i], xs))
        outputs.append(out)
    return carry, jax.tree_util.tree_map(lambda *v: jnp.stack(v), *outputs)


def make_train_step(objective: Objective, tx: optax.GradientTransformation, ema_rate: float, *,
                    ema_warmup: bool = False, grad_accum_steps: int = 1, axis_name: Optional[str] = None,
                    unroll: bool = False, target_rate: Optional[Callable[[Array], Array]] = None):
    """One optimizer step: grads of `objective(params, step_rng, batch, context)` with respect to
    params, the context (`context_from_state`) holding the state's step and EMA params before the
    update; optax update, EMA update (decay `ema_rate`, or with `ema_warmup` diffusers' warm-up of
    it: `sdejax.training.state.ema_decay`).

    grad = (1/A) Σ_m ∇L(microbatch m) for `grad_accum_steps` = A (equal microbatches, so this is
    the gradient of the batch mean); with `axis_name` (pmap) loss and grads are averaged over it.
    metrics = {"loss", "grad_norm"} (grad_norm before clipping) so a non-finite value can be named.
    `unroll`: accumulate over the microbatches in a Python loop instead of a scan (see `scan`).

    A state with `target_params` θ⁻ (consistency training/distillation) also gets, after the optimizer
    update, θ⁻ ← μ θ⁻ + (1 − μ) θ with μ = `target_rate(step)` of the pre-update step.
    `train_step(state, batch, teacher_params=None)`: frozen teacher parameters (distillation) enter
    as an argument and reach the objective through `context.teacher_params`.
    """
    if grad_accum_steps < 1:
        raise ValueError(f"grad_accum_steps must be >= 1; got {grad_accum_steps}")
    grad_fn = jax.value_and_grad(objective, has_aux=True)

    def loss_and_grads(params, rng, batch, context):
        n = batch["x"].shape[0]
        if n % grad_accum_steps:
            raise ValueError(f"batch of {n} rows per shard is not divisible by grad_accum_steps={grad_accum_steps}")
        batch = {**batch, "index": _global_index(n, axis_name)}
        if grad_accum_steps == 1:
            (loss, _), grads = grad_fn(params, rng, batch, context)
            return loss, grads

        def accumulate(carry, micro):
            (loss, _), grads = grad_fn(params, rng, micro, context)
            return jax.tree_util.tree_map(jnp.add, carry, (loss, grads)), None

        zeros = (jnp.zeros(()), jax.tree_util.tree_map(jnp.zeros_like, params))
        total, _ = scan(accumulate, zeros, _microbatches(batch, grad_accum_steps), unroll)
        return jax.tree_util.tree_map(lambda v: v / grad_accum_steps, total)

    def update_target(state: TrainState, params: Any) -> Any:
        if state.target_params is None:
            return None
        if target_rate is None:
            raise ValueError("the state has target_params but make_train_step got no target_rate")
        return ema_update(state.target_params, params, target_rate(state.step))

    def train_step(state: TrainState, batch: dict, teacher_params: Any = None) -> tuple[TrainState, dict]:
        rng, step_rng = jax.random.split(state.rng)
        loss, grads = loss_and_grads(state.params, step_rng, batch, context_from_state(state, teacher_params))
        if axis_name is not None:
            loss, grads = jax.lax.pmean((loss, grads), axis_name)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        decay = ema_decay(state.step, ema_rate, ema_warmup)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  ema_params=ema_update(state.ema_params, params, decay), rng=rng,
                                  target_params=update_target(state, params))
        return new_state, {"loss": loss, "grad_norm": optax.global_norm(grads)}

    return train_step


def make_multi_step(train_step: Callable[[TrainState, dict], tuple[TrainState, dict]], unroll: bool = False):
    """`multi_step(state, batches, teacher_params=None)`: `train_step` scanned (or with `unroll`,
    unrolled) over the leading axis of `batches` (K steps in one dispatch), every step given the same
    `teacher_params`; metrics come back stacked, shape (K,)."""

    def multi_step(state: TrainState, batches: dict, teacher_params: Any = None) -> tuple[TrainState, dict]:
        if teacher_params is None:
            return scan(train_step, state, batches, unroll)
        return scan(lambda st, batch: train_step(st, batch, teacher_params), state, batches, unroll)

    return multi_step


def make_eval_step(objective: Objective):
    """`eval_step(params, rng, batch, context) -> loss` (use with EMA params and an eval-mode objective)."""

    def eval_step(params: Any, rng: Array, batch: dict, context: Context) -> Array:
        return objective(params, rng, batch, context)[0]

    return eval_step
