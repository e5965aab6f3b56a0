"""The training objective the train step differentiates: `objective(params, rng, batch, context)
-> (loss, aux)`.

`context` carries what a curriculum or a teacher needs besides the batch: the optimizer step (a
traced int32, so a schedule over steps compiles once), the EMA parameters, and optional target
(consistency training) and teacher (distillation) parameters, None unless the objective needs
them. The step builds it from the train state (`context_from_state`); gradients are taken with
respect to `params` only. A library loss `loss_fn(params, rng, batch)` (`sdejax.losses`) needs no
context and becomes an objective through `from_loss`.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Protocol

import flax
import jax

from sdejax.training.state import TrainState

Array = jax.Array


@flax.struct.dataclass
class Context:
    """What an objective may read besides params, rng and batch (a pytree; None fields are empty)."""

    step: Array
    ema_params: Any
    target_params: Optional[Any] = None
    teacher_params: Optional[Any] = None


class Objective(Protocol):
    def __call__(self, params: Any, rng: Array, batch: dict, context: Context) -> tuple[Array, dict]:
        """(scalar loss, aux dict) of `params` on `batch`, noise from `rng`."""


def context_from_state(state: TrainState, teacher_params: Any = None) -> Context:
    """The context of the step about to be taken from `state` (its step, EMA and target parameters),
    with the frozen `teacher_params` of distillation (held by the setup, not the state)."""
    return Context(step=state.step, ema_params=state.ema_params, target_params=state.target_params,
                   teacher_params=teacher_params)


def with_frozen_base(objective: Objective) -> Objective:
    """The objective of a LoRA adapter over the frozen teacher (LCM-LoRA): `objective` sees the pairs
    (context.teacher_params, adapter) as its params, EMA and target (`sdejax.models.lora.joined_apply_fn`
    reads them); gradients reach the adapter only."""

    def wrapped(params: Any, rng: Array, batch: dict, context: Context) -> tuple[Array, dict]:
        pair = lambda adapter: None if adapter is None else (context.teacher_params, adapter)  # noqa: E731
        inner = context.replace(ema_params=pair(context.ema_params), target_params=pair(context.target_params))
        return objective(pair(params), rng, batch, inner)

    return wrapped


def from_loss(loss_fn: Callable[[Any, Array, dict], tuple[Array, dict]]) -> Objective:
    """The objective of a library loss `loss_fn(params, rng, batch)`, which ignores the context."""

    def objective(params: Any, rng: Array, batch: dict, context: Context) -> tuple[Array, dict]:
        del context
        return loss_fn(params, rng, batch)

    return objective
