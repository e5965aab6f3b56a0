"""Pure step functions: `train_step(state, batch) -> (state, metrics)`, its `lax.scan` over a
stack of batches (several steps per dispatch), and `eval_step(params, rng, batch) -> loss`.

Nothing here knows about devices or data sources: a step is a function of (state, batch) only, so
data/model-parallel placement (jit + Mesh, pmap) and other input pipelines wrap it unchanged.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import optax

from sdejax.training.state import TrainState, ema_update

Array = jax.Array
LossFn = Callable[[Any, Array, dict], tuple[Array, dict]]


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, ema_rate: float):
    """One optimizer step: grads of `loss_fn(params, step_rng, batch)`, optax update, EMA update.

    metrics = {"loss", "grad_norm"} (grad_norm before clipping) so a non-finite value can be named.
    """

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        rng, step_rng = jax.random.split(state.rng)
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, step_rng, batch)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  ema_params=ema_update(state.ema_params, params, ema_rate), rng=rng)
        return new_state, {"loss": loss, "grad_norm": optax.global_norm(grads)}

    return train_step


def make_multi_step(train_step: Callable[[TrainState, dict], tuple[TrainState, dict]]):
    """`multi_step(state, batches)`: `train_step` scanned over the leading axis of `batches`
    (K steps in one dispatch); metrics come back stacked, shape (K,)."""

    def multi_step(state: TrainState, batches: dict) -> tuple[TrainState, dict]:
        return jax.lax.scan(train_step, state, batches)

    return multi_step


def make_eval_step(loss_fn: LossFn):
    """`eval_step(params, rng, batch) -> loss` (use with EMA params and an eval-mode loss)."""

    def eval_step(params: Any, rng: Array, batch: dict) -> Array:
        return loss_fn(params, rng, batch)[0]

    return eval_step
