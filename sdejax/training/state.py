"""Train state (params, optimizer state, EMA params, step, rng, and the consistency target θ⁻ where
the objective keeps one — all pytrees), the optax optimizer from `config.optim`, and the exponential
moving average of the parameters."""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

Array = jax.Array

OPTIMIZERS = ("Adam", "AdamW", "RAdam")


@flax.struct.dataclass
class TrainState:
    """Everything a training step reads and writes. `rng` is a raw uint32 key (orbax-friendly);
    `params` is a Flax variables dict, of which only the "params" collection is trained.
    `target_params`: the target network θ⁻ of consistency training/distillation (an EMA of `params`
    at the objective's rate, `sdejax.training.step`), None for every other objective (it then has no
    leaves, so such states and their checkpoints are those of before the field existed)."""

    step: Array
    params: Any
    opt_state: Any
    ema_params: Any
    rng: Array
    target_params: Any = None


def _trainable_labels(params: Any) -> Any:
    """"train" for leaves of the "params" collection, "frozen" for the rest (e.g. Fourier W)."""
    return {k: jax.tree_util.tree_map(lambda _: "train" if k == "params" else "frozen", v) for k, v in params.items()}


def get_lr_schedule(optim: ml_collections.ConfigDict) -> optax.Schedule:
    """lr(step) = optim.lr · min(1, step / warmup) (constant without warmup)."""
    if optim.warmup > 0:
        return optax.linear_schedule(0.0, optim.lr, optim.warmup)
    return optax.constant_schedule(optim.lr)


def get_optimizer(optim: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """clip_by_global_norm(grad_clip) (if > 0) → Adam(lr·min(1, step/warmup), beta1, beta2, eps)
    (+ decoupled weight decay for AdamW; AMSGrad with `optim.amsgrad`, as NCSN; RAdam, Liu et al.'s
    variance-rectified Adam, the consistency models' optimizer), applied to the "params" collection
    only. `optim.beta2` defaults to 0.999 (score_sde's configs have no such key).

    As the original, the learning rate ramps linearly from 0 over `warmup` steps.
    """
    if optim.optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optim.optimizer {optim.optimizer!r}; valid: {list(OPTIMIZERS)}")
    lr, betas = get_lr_schedule(optim), dict(b1=optim.beta1, b2=optim.get("beta2", 0.999), eps=optim.eps)
    if optim.get("amsgrad", False) and optim.optimizer != "Adam":
        raise ValueError("optim.amsgrad is supported with optim.optimizer = 'Adam' only")
    if optim.weight_decay and optim.optimizer != "AdamW":
        raise ValueError("optim.weight_decay needs optim.optimizer = 'AdamW' (decoupled decay)")
    if optim.optimizer == "AdamW":
        opt = optax.adamw(lr, weight_decay=optim.weight_decay, **betas)
    elif optim.optimizer == "RAdam":
        opt = optax.radam(lr, **betas)
    else:
        opt = (optax.amsgrad if optim.get("amsgrad", False) else optax.adam)(lr, **betas)
    chain = [optax.clip_by_global_norm(optim.grad_clip)] if optim.grad_clip > 0 else []
    tx = optax.chain(*chain, opt)
    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, _trainable_labels)


def ema_decay(step: Array | int, rate: float, warmup: bool) -> Array | float:
    """The EMA decay of the update after optimizer step `step` (0 for the first update): `rate`
    (score_sde's fixed rate), or with `warmup` min(rate, (1 + step)/(10 + step)) as diffusers'
    EMAModel, so the initial network's weight ∏ decay falls fast (0.1 after the first update).

    A function of the step stored in the train state only, so a resumed run decays identically."""
    if not warmup:
        return rate
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(rate, (1.0 + step) / (10.0 + step))


def ema_update(ema: Any, params: Any, rate: Array | float) -> Any:
    """ema ← rate·ema + (1 − rate)·params."""
    return jax.tree_util.tree_map(lambda e, p: rate * e + (1.0 - rate) * p, ema, params)


def create_train_state(params: Any, tx: optax.GradientTransformation, rng: Array,
                       with_target: bool = False) -> TrainState:
    """Step 0, EMA (and with `with_target` the target θ⁻) initialised to the parameters."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ema_params=params, rng=jnp.asarray(rng), target_params=params if with_target else None)
