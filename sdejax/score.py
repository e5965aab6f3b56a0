"""Model output ↔ score / eps / x0 / v, and network → score function.

For a linear SDE x_t = α_t x_0 + σ_t ε (ε ~ N(0, I)) the four parameterisations are related by

    score = −ε / σ_t,   x_0 = (x_t − σ_t ε) / α_t,   v = α_t ε − σ_t x_0,
    ε = (σ_t x_t + α_t v) / (α_t² + σ_t²),   x_0 = (α_t x_t − σ_t v) / (α_t² + σ_t²),

which hold for VE (α = 1), VP (α² + σ² = 1) and sub-VP alike. Every conversion goes through ε.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from sdejax.sde import SDE, VESDE, VPSDE, batch_broadcast, check_time, subVPSDE

Array = jax.Array
ApplyFn = Callable[..., Array]

PREDICTIONS = ("score", "eps", "x0", "v")


def _check_prediction(kind: str) -> None:
    if kind not in PREDICTIONS:
        raise ValueError(f"unknown prediction {kind!r}; valid: {list(PREDICTIONS)}")


def to_eps(kind: str, value: Array, x: Array, alpha: Array, sigma: Array) -> Array:
    """The noise ε implied by a prediction `value` of type `kind` at x_t = x with per-example (α, σ)."""
    _check_prediction(kind)
    a, s = batch_broadcast(alpha, x), batch_broadcast(sigma, x)
    if kind == "score":
        return -s * value
    if kind == "eps":
        return value
    if kind == "x0":
        return (x - a * value) / s
    return (s * x + a * value) / (a**2 + s**2)


def from_eps(kind: str, eps: Array, x: Array, alpha: Array, sigma: Array) -> Array:
    """Express the noise ε at x_t = x as a prediction of type `kind` ("score", "eps", "x0", "v")."""
    _check_prediction(kind)
    a, s = batch_broadcast(alpha, x), batch_broadcast(sigma, x)
    if kind == "score":
        return -eps / s
    if kind == "eps":
        return eps
    x0 = (x - s * eps) / a
    if kind == "x0":
        return x0
    return a * eps - s * x0


def convert(value: Array, src: str, dst: str, x: Array, alpha: Array, sigma: Array) -> Array:
    """Convert a prediction between parameterisations at x_t = x, e.g. `convert(v, "v", "x0", ...)`."""
    if src == dst:
        _check_prediction(src)
        return value
    return from_eps(dst, to_eps(src, value, x, alpha, sigma), x, alpha, sigma)


def tweedie_x0(sde: SDE, score_fn: Callable[[Array, Array], Array], x: Array, t: Array) -> Array:
    """Tweedie's estimate x̂₀ = E[x₀ | x_t] = (x_t + σ_t² ∇log p_t(x_t)) / α_t, `t` of shape (batch,)."""
    alpha, sigma = sde.marginal_coeffs(t)
    return convert(score_fn(x, t), "score", "x0", x, alpha, sigma)


def network_inputs(sde: SDE, t: Array, continuous: bool) -> tuple[Array, Array, Array]:
    """Labels fed to the network at time t, and the (α, σ) that turn its output into a score.

    The conventions of the original score_sde, so its checkpoints behave identically:
    VE continuous: labels σ(t); VE discrete: round((T − t)(N − 1)) indexing the descending σ table.
    VP/sub-VP continuous: labels 999 t. VP discrete: labels t(N − 1), with (α, σ) = (sqrt(ᾱ), sqrt(1 − ᾱ))
    from the DDPM table at int(t(N − 1)).
    """
    alpha, sigma = sde.marginal_coeffs(t)
    if isinstance(sde, VESDE):
        if continuous:
            return sigma, alpha, sigma
        labels = jnp.round((sde.T - t) * (sde.N - 1)).astype(jnp.int32)
        sigma = jnp.asarray(sde.discrete_sigmas[::-1], t.dtype)[labels]
        return labels, alpha, sigma
    if isinstance(sde, subVPSDE):
        if not continuous:
            raise ValueError("subVPSDE has no discrete-time score parameterisation; use continuous=True")
        return 999.0 * t, alpha, sigma
    if isinstance(sde, VPSDE):
        if continuous:
            return 999.0 * t, alpha, sigma
        labels = t * (sde.N - 1)
        abar = jnp.asarray(sde.alphas_cumprod, t.dtype)[labels.astype(jnp.int32)]
        return labels, jnp.sqrt(abar), jnp.sqrt(1.0 - abar)
    raise ValueError(
        f"no network label convention for {type(sde).__name__}; supported: VESDE, VPSDE, subVPSDE"
    )


DEFAULT_PREDICTION = {VESDE: "score", VPSDE: "eps", subVPSDE: "eps"}


def get_score_fn(
    sde: SDE,
    apply_fn: ApplyFn,
    params: Any,
    prediction: str | None = None,
    continuous: bool = True,
    train: bool = False,
    rng: Array | None = None,
) -> Callable[[Array, Array], Array]:
    """Turn a network `apply_fn(params, x, labels, *, train, rng)` into `score_fn(x, t)`.

    `prediction` says what the network outputs ("score", "eps", "x0", "v"). The default follows the
    original: the score for VE, ε for VP and sub-VP (score = −output/σ_t).
    """
    if prediction is None:
        prediction = DEFAULT_PREDICTION.get(type(sde), "score")
    _check_prediction(prediction)
    if isinstance(sde, subVPSDE) and not continuous:
        raise ValueError("subVPSDE has no discrete-time score parameterisation; use continuous=True")

    def score_fn(x: Array, t: Array) -> Array:
        check_time(x, t)
        labels, alpha, sigma = network_inputs(sde, t, continuous)
        out = apply_fn(params, x, labels, train=train, rng=rng)
        return convert(out, prediction, "score", x, alpha, sigma)

    return score_fn
