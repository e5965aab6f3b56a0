"""Masked (absorbing-state) discrete diffusion in continuous time (MD4 / MDLM).

Data are D tokens in {0, ..., K−1}; MASK is the extra index K. The forward process keeps each token
independently with probability α(t) and replaces it by MASK otherwise,

    q(z_t,i | x_i) = α(t) δ(z_t,i = x_i) + (1 − α(t)) δ(z_t,i = MASK),   α(0) = 1, α(1) = 0,

with α decreasing (α′ < 0). The denoiser's logits over the K real tokens are turned into SUBS
log-probabilities (`subs_log_probs`): −∞ on MASK (zero mass), and a masked token's categorical over
the K tokens; an unmasked token is copied (log-prob 0 on itself). The continuous-time NELBO is

    L(x) = ∫_{t_min}^1 (−α′(t) / (1 − α(t))) E_{z_t}[Σ_{i: z_t,i = MASK} −log p_θ(x_i | z_t)] dt
           + D (1 − α(t_min)) log K   (reconstruction: tokens still masked at t_min cost log K each)
           + 0                        (prior: z_1 is all-MASK surely since α(1) = 0, KL = 0).

The weight −α′/(1−α) is singular at t = 0 (1/t for linear α) while the expected masked count
D(1 − α) vanishes there, so the integrand is finite; t_min (the ε clamp, default 1e-4) keeps the
estimator finite and the reconstruction term keeps it an upper bound on −log p_θ(x). With t_min = 0
both endpoint terms are exactly zero for α(0) = 1, α(1) = 0. (MD4 instead clamps α itself to
[ε, 1−ε]; its prior term is then only ≈ 0.) Reported in bits per dimension: L / (D ln 2).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp

Array = jax.Array
LossFn = Callable[[Any, Array, dict], tuple[Array, dict]]

GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0  # Kronecker-sequence step for low-discrepancy times

# α̃(t) and α̃′(t) for each schedule; α(0) = 1, α(1) = 0.
_SCHEDULES: dict[str, tuple[Callable[[Array], Array], Callable[[Array], Array]]] = {
    "linear": (lambda t: 1.0 - t, lambda t: -jnp.ones_like(t)),
    "cosine": (lambda t: 1.0 - jnp.cos(0.5 * jnp.pi * (1.0 - t)),
               lambda t: -0.5 * jnp.pi * jnp.sin(0.5 * jnp.pi * (1.0 - t))),
}
T_SAMPLING = ("uniform", "golden")


@dataclass(frozen=True)
class MaskingSchedule:
    """The keep probability α(t) and its derivative α′(t) of a named schedule (`SCHEDULE_NAMES`)."""

    name: str = "linear"

    def __post_init__(self):
        if self.name not in _SCHEDULES:
            raise ValueError(f"unknown masking schedule {self.name!r}; valid: {sorted(_SCHEDULES)}")

    def alpha(self, t: Array) -> Array:
        return _SCHEDULES[self.name][0](jnp.asarray(t))

    def dalpha(self, t: Array) -> Array:
        return _SCHEDULES[self.name][1](jnp.asarray(t))

    def weight(self, t: Array) -> Array:
        """−α′(t) / (1 − α(t)) > 0, the weight on the masked cross-entropy."""
        return -self.dalpha(t) / (1.0 - self.alpha(t))


SCHEDULE_NAMES = tuple(sorted(_SCHEDULES))


def forward_mask(key: Array, x: Array, alpha: Array, num_tokens: int) -> Array:
    """z ~ q(z_t | x): each token kept with probability α (broadcast over x's trailing axes), else MASK = K."""
    keep = jax.random.uniform(key, x.shape) < jnp.reshape(alpha, jnp.shape(alpha) + (1,) * (x.ndim - jnp.ndim(alpha)))
    return jnp.where(keep, x, num_tokens)


def subs_log_probs(logits: Array, z: Array) -> Array:
    """SUBS log-probabilities (..., K+1) from logits (..., K) at tokens z (...): MASK (index K) gets −∞;
    masked positions get log_softmax(logits); unmasked positions are copied (0 at z, −∞ elsewhere)."""
    num_tokens = logits.shape[-1]
    if logits.shape[:-1] != z.shape:
        raise ValueError(f"logits must have shape z.shape + (K,) = {z.shape} + (K,); got {logits.shape}")
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    logp = jnp.concatenate([logp, jnp.full(logp.shape[:-1] + (1,), -jnp.inf)], axis=-1)
    copied = jnp.where(jax.nn.one_hot(z, num_tokens + 1, dtype=bool), 0.0, -jnp.inf)
    return jnp.where((z == num_tokens)[..., None], logp, copied)


def masked_cross_entropy(log_probs: Array, x: Array, z: Array, num_tokens: int) -> Array:
    """Σ_{i: z_i = MASK} −log p(x_i | z) per example (B,), from SUBS log-probs (B, ..., K+1)."""
    ce = -jnp.take_along_axis(log_probs, x[..., None], axis=-1)[..., 0]
    ce = jnp.where(z == num_tokens, ce, 0.0)
    return jnp.sum(jnp.reshape(ce, (ce.shape[0], -1)), axis=-1)


def sample_times(keys: Array, index: Array, shift_key: Array, t_min: float, t_sampling: str) -> Array:
    """t ∈ [t_min, 1] per example: iid uniform from each example's key, or the low-discrepancy
    Kronecker sequence t = frac(u₀ + index·φ) (φ = golden ratio − 1, one shared u₀), which only needs
    the example's global index, so it is the same whatever the sharding."""
    if t_sampling not in T_SAMPLING:
        raise ValueError(f"unknown t_sampling {t_sampling!r}; valid: {list(T_SAMPLING)}")
    if t_sampling == "uniform":
        u = jax.vmap(jax.random.uniform)(keys)
    else:
        u = jnp.mod(jax.random.uniform(shift_key) + index.astype(jnp.float32) * GOLDEN, 1.0)
    return t_min + (1.0 - t_min) * u


def nelbo_terms(log_probs: Array, x: Array, z: Array, t: Array, schedule: MaskingSchedule,
                t_min: float) -> Array:
    """One-sample NELBO per example (nats): (1 − t_min)·w(t)·masked CE + D (1 − α(t_min)) log K."""
    num_tokens = log_probs.shape[-1] - 1
    dim = math.prod(x.shape[1:])
    recon = dim * (1.0 - schedule.alpha(jnp.asarray(t_min, jnp.float32))) * math.log(num_tokens)
    return (1.0 - t_min) * schedule.weight(t) * masked_cross_entropy(log_probs, x, z, num_tokens) + recon


def masked_diffusion_loss(apply_fn: Callable[..., Array], num_tokens: int, schedule: str = "linear",
                          t_min: float = 1e-4, t_sampling: str = "golden", train: bool = True) -> LossFn:
    """loss_fn(params, rng, batch) -> (mean NELBO per token in nats, aux) for tokens batch["x"] (B, ...)
    in {0..K−1}. apply_fn(params, z, t, train=, rng=) returns logits (B, ..., K) for z (B, ...) with
    MASK = K and t (B,). Per example, t (iid or `golden`) and the mask come from fold_in(key, index),
    index = batch["index"] (default 0..B−1). aux: {"losses": NELBO nats (B,), "bpd": (B,), "t": (B,)}."""
    sched = MaskingSchedule(schedule)
    if not 0.0 <= t_min < 1.0:
        raise ValueError(f"t_min must be in [0, 1); got {t_min}")

    def loss_fn(params, rng, batch):
        x = _check_tokens(batch, num_tokens)
        n, dim = x.shape[0], math.prod(x.shape[1:])
        index = batch.get("index", jnp.arange(n))
        if jnp.shape(index) != (n,):
            raise ValueError(f"batch['index'] must have shape ({n},); got {jnp.shape(index)}")
        t_rng, m_rng, net_rng, shift_rng = jax.random.split(rng, 4)
        fold = jax.vmap(jax.random.fold_in, in_axes=(None, 0))
        t = sample_times(fold(t_rng, index), index, shift_rng, t_min, t_sampling)
        z = jax.vmap(lambda k, xi, a: forward_mask(k, xi, a, num_tokens))(fold(m_rng, index), x, sched.alpha(t))
        logits = apply_fn(params, z, t, train=train, rng=jax.random.fold_in(net_rng, index[0]))
        losses = nelbo_terms(subs_log_probs(logits, z), x, z, t, sched, t_min)
        return jnp.mean(losses) / dim, {"losses": losses, "bpd": losses / (dim * math.log(2.0)), "t": t}

    return loss_fn


def _check_tokens(batch: dict, num_tokens: int) -> Array:
    if "x" not in batch:
        raise ValueError(f"batch must be a dict with key 'x' (integer tokens); got keys {sorted(batch)}")
    x = jnp.asarray(batch["x"])
    if not jnp.issubdtype(x.dtype, jnp.integer) or x.ndim < 2:
        raise ValueError(f"batch['x'] must be integer tokens of shape (batch, ...); got {x.dtype} {x.shape}")
    return x


def levels_to_tokens(x: Array, num_levels: int = 17) -> Array:
    """Images in [0, 1] on a `num_levels` grid (the digits' 17 gray levels) -> int32 tokens 0..L−1."""
    return jnp.clip(jnp.round(jnp.asarray(x) * (num_levels - 1)), 0, num_levels - 1).astype(jnp.int32)
