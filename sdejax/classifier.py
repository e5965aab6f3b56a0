"""Noise-conditional classifiers for classifier guidance: training loss, log-prob function, report.

A classifier f_φ(x_t, t) -> logits (B, K) is trained on data perturbed by the same SDE as the score
model, x_t = α_t x_0 + σ_t z with t ~ U[eps, T], by the cross-entropy

    L(φ) = E_{t, (x_0, y), z} [ −log softmax(f_φ(c_in x_t, c_noise(t)))_y ],

whose minimiser is the exact posterior p_t(y | x_t). The network reads the score model's noise labels
c_noise (`sdejax.precond.LABELS`, default the schedule's continuous convention) and the input scaled
by c_in = 1/sqrt(α² σ_d² + σ²) (unit-variance x_t for data of scale σ_d; `sigma_data=None`: c_in = 1).
`classifier_log_prob_fn` reads the classifier at the sampler's t in the same way, so that
`sdejax.guidance.classifier_guidance(score_fn, log_prob_fn, y, γ)` gives s + γ ∇ₓ log p_φ(y | x_t, t).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from jax.tree_util import Partial

from sdejax.guidance import check_classes
from sdejax.losses import _check_batch, _example_keys, _per_example_normal
from sdejax.precond import LABELS
from sdejax.sde import SDE, batch_broadcast, check_time

Array = jax.Array
ApplyFn = Callable[..., Array]
LossFn = Callable[[Any, Array, dict], tuple[Array, dict]]


def _labels_name(sde: SDE, labels: Optional[str]) -> str:
    name = sde.default_precond(True).labels if labels is None else labels
    if name not in LABELS:
        raise ValueError(f"unknown noise labels {name!r}; valid: {sorted(LABELS)}")
    return name


def _check_sigma_data(sigma_data: Optional[float]) -> Optional[float]:
    if sigma_data is not None and not sigma_data > 0:
        raise ValueError(f"sigma_data must be > 0 or None; got {sigma_data}")
    return None if sigma_data is None else float(sigma_data)


def classifier_inputs(sde: SDE, x: Array, t: Array, labels: str, sigma_data: Optional[float]) -> tuple[Array, Array]:
    """(c_in x, c_noise(t)): what the classifier network sees at (x_t, t) (module docstring)."""
    c_noise, alpha, sigma = LABELS[labels](sde, t)
    if sigma_data is None:
        return x, c_noise
    c_in = jax.lax.rsqrt(jnp.square(alpha * sigma_data) + jnp.square(sigma)).astype(x.dtype)
    return batch_broadcast(c_in, x) * x, c_noise


def cross_entropy(logits: Array, y: Array) -> tuple[Array, Array]:
    """(−log softmax(logits)_y, 1[argmax logits = y]) per example."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, y[:, None], axis=-1)[:, 0]
    return nll, (jnp.argmax(logits, axis=-1) == y).astype(logits.dtype)


def get_classifier_loss_fn(sde: SDE, apply_fn: ApplyFn, train: bool, eps: float = 1e-5,
                           labels: Optional[str] = None, sigma_data: Optional[float] = 1.0) -> LossFn:
    """`loss_fn(params, rng, batch) -> (mean cross-entropy, {"losses", "t", "accuracy"})` (module
    docstring) with `batch["x"]` the data x_0 and `batch["y"]` its classes; `apply_fn(params, x,
    labels, *, train, rng)` returns logits (B, K). t ~ U[eps, T] and z are drawn per example from
    fold_in(key, batch["index"]) exactly as the score losses (`sdejax.losses`); "accuracy" is the
    batch mean of argmax = y. Jit- and grad-safe."""
    name, sigma_data = _labels_name(sde, labels), _check_sigma_data(sigma_data)
    if not sde.t_min <= eps < sde.T:
        raise ValueError(f"eps must lie in [t_min={sde.t_min}, T={sde.T}); got {eps}")

    def loss_fn(params: Any, rng: Array, batch: dict) -> tuple[Array, dict]:
        x0 = _check_batch(batch)
        if "y" not in batch:
            raise ValueError(f"the classifier loss needs classes batch['y']; got keys {sorted(batch)}")
        t_keys, z_keys, net_rng = _example_keys(rng, batch)
        t = eps + jax.vmap(lambda k: jax.random.uniform(k, (), x0.dtype))(t_keys) * (sde.T - eps)
        alpha, sigma = sde.marginal_coeffs(t)
        z = _per_example_normal(z_keys, x0)
        xt = batch_broadcast(alpha, x0) * x0 + batch_broadcast(sigma, x0) * z
        x_in, c_noise = classifier_inputs(sde, xt, t, name, sigma_data)
        logits = apply_fn(params, x_in, c_noise, train=train, rng=net_rng)
        y = check_classes("batch['y']", batch["y"], x0.shape[0], logits.shape[-1])
        losses, correct = cross_entropy(logits, y)
        return jnp.mean(losses), {"losses": losses, "t": t, "accuracy": jnp.mean(correct)}

    return loss_fn


@dataclasses.dataclass(frozen=True)
class _ClassifierLogProb:
    sde: SDE
    apply_fn: ApplyFn
    labels: str
    sigma_data: Optional[float]

    def __call__(self, params: Any, x: Array, t: Array) -> Array:
        check_time(x, t)
        x_in, c_noise = classifier_inputs(self.sde, x, t, self.labels, self.sigma_data)
        return self.apply_fn(params, x_in, c_noise, train=False)


def classifier_log_prob_fn(sde: SDE, apply_fn: ApplyFn, params: Any, labels: Optional[str] = None,
                           sigma_data: Optional[float] = 1.0) -> Partial:
    """`log_prob_fn(x, t) -> logits` (B, K) of a trained classifier, read as in its loss (same `labels`
    and `sigma_data`): a `Partial` with `params` as leaves, so `classifier_guidance` composes with
    every sampler and new params reuse the compiled program."""
    return Partial(_ClassifierLogProb(sde, apply_fn, _labels_name(sde, labels), _check_sigma_data(sigma_data)),
                   params)


@jax.jit
def _accuracies(sde: SDE, log_prob_fn: Partial, x: Array, z: Array, y: Array, mask: Array, times: Array) -> Array:
    """Σ correct / Σ mask at each t, x, z, y, mask batched as (num_batches, batch, ...)."""

    def at_time(t):
        def one_batch(total, batch):
            xb, zb, yb, mb = batch
            tt = jnp.full(xb.shape[:1], t, xb.dtype)
            alpha, sigma = sde.marginal_coeffs(tt)
            xt = batch_broadcast(alpha, xb) * xb + batch_broadcast(sigma, xb) * zb
            correct = jnp.argmax(log_prob_fn(xt, tt), axis=-1) == yb
            return total + jnp.sum(jnp.where(mb, correct, False)), None

        total, _ = jax.lax.scan(one_batch, jnp.zeros((), jnp.int32), (x, z, y, mask))
        return total / jnp.sum(mask)

    return jax.lax.map(at_time, times)


def accuracy_by_noise_level(sde: SDE, log_prob_fn: Callable[[Array, Array], Array], x: Array, y: Array,
                            times, rng: Array, batch_size: int = 1024) -> Array:
    """Accuracy of argmax_k log_prob_fn(x_t, t)_k against y at each t in `times`, shape (len(times),),
    with x_t = α_t x + σ_t z from clean data x (B, ...) and one z ~ N(0, I) per example from `rng`,
    shared by all t (so two classifiers called with the same rng are compared on the same x_t).
    `log_prob_fn` should be a pytree (`Partial`) so new parameters reuse the compiled program; the
    data is scanned in batches of `batch_size`."""
    x = jnp.asarray(x)
    n = x.shape[0]
    y = check_classes("y", y, n, jnp.iinfo(jnp.int32).max)
    times = jnp.asarray(times, x.dtype).reshape(-1)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    batch_size = min(batch_size, n)
    pad = -n % batch_size
    z = jax.random.normal(rng, x.shape, x.dtype)
    chunk = lambda v: jnp.reshape(jnp.pad(v, [(0, pad)] + [(0, 0)] * (v.ndim - 1)),  # noqa: E731
                                  (-1, batch_size) + v.shape[1:])
    mask = jnp.reshape(jnp.arange(n + pad) < n, (-1, batch_size))
    if not isinstance(log_prob_fn, Partial):
        log_prob_fn = Partial(log_prob_fn)
    return _accuracies(sde, log_prob_fn, chunk(x), chunk(z), chunk(y), mask, times)
