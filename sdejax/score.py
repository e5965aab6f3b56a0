"""Model output ↔ score / eps / x0 / v, and network → score function.

For a linear SDE x_t = α_t x_0 + σ_t ε (ε ~ N(0, I)) the four parameterisations are related by

    score = −ε / σ_t,   x_0 = (x_t − σ_t ε) / α_t,   v = α_t ε − σ_t x_0,
    ε = (σ_t x_t + α_t v) / (α_t² + σ_t²),   x_0 = (α_t x_t − σ_t v) / (α_t² + σ_t²),

which hold for VE (α = 1), VP (α² + σ² = 1) and sub-VP alike. Every conversion goes through ε.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
from jax.tree_util import Partial

from sdejax.precond import PREDICTIONS, Precond, check_prediction  # noqa: F401  (PREDICTIONS re-exported)
from sdejax.sde import SDE, batch_broadcast, check_time

Array = jax.Array
ApplyFn = Callable[..., Array]


def to_eps(kind: str, value: Array, x: Array, alpha: Array, sigma: Array) -> Array:
    """The noise ε implied by a prediction `value` of type `kind` at x_t = x with per-example (α, σ)."""
    check_prediction(kind)
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
    check_prediction(kind)
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
        check_prediction(src)
        return value
    return from_eps(dst, to_eps(src, value, x, alpha, sigma), x, alpha, sigma)


def tweedie_x0(sde: SDE, score_fn: Callable[[Array, Array], Array], x: Array, t: Array) -> Array:
    """Tweedie's estimate x̂₀ = E[x₀ | x_t] = (x_t + σ_t² ∇log p_t(x_t)) / α_t, `t` of shape (batch,)."""
    alpha, sigma = sde.marginal_coeffs(t)
    return convert(score_fn(x, t), "score", "x0", x, alpha, sigma)


@dataclasses.dataclass(frozen=True)
class NetworkScore:
    """score(x, t) of a network through its preconditioner: `NetworkScore(...)(params, rng, x, t, y)`,
    `y` the integer classes (B,) of a class-conditional network (None: the null class); with
    `kind` = "x0" / "eps" / "v" the same prediction in that parameterisation instead of the score.

    Hashable (the network, schedule and preconditioner are static), so `get_score_fn` can hand the
    samplers a `Partial` whose only leaves are the parameters and the dropout key.
    """

    sde: SDE
    apply_fn: ApplyFn
    precond: Precond
    train: bool = False
    kind: str = "score"

    def __call__(self, params: Any, rng: Array | None, x: Array, t: Array, y: Array | None = None) -> Array:
        check_time(x, t)
        cond = {} if y is None else {"y": y}  # a network without classes never sees `y`
        net = lambda x_in, labels: self.apply_fn(params, x_in, labels, train=self.train, rng=rng, **cond)  # noqa: E731
        pred, alpha, sigma = self.precond.apply(net, self.sde, x, t)
        return convert(pred, self.precond.output, self.kind, x, alpha, sigma)


def resolve_precond(sde: SDE, precond: Precond | None = None, prediction: str | None = None,
                    continuous: bool = True) -> Precond:
    """`precond`, or the schedule's default (`sde.default_precond(continuous)`), with its output kind
    replaced by `prediction` when given (plain preconditioners only)."""
    precond = sde.default_precond(continuous) if precond is None else precond
    if prediction is None or prediction == precond.output:
        return precond
    check_prediction(prediction)
    if precond.sigma_data is not None:
        raise ValueError(f"prediction={prediction!r} conflicts with EDM preconditioning (it predicts x0)")
    return dataclasses.replace(precond, output=prediction)


def get_score_fn(
    sde: SDE,
    apply_fn: ApplyFn,
    params: Any,
    prediction: str | None = None,
    continuous: bool = True,
    train: bool = False,
    rng: Array | None = None,
    precond: Precond | None = None,
    y: Array | None = None,
) -> Partial:
    """Turn a network `apply_fn(params, x, labels, *, train, rng)` into `score_fn(x, t)`.

    The network is read through `precond` (default: the schedule's own, e.g. score_sde's score output
    for VE and ε for VP / sub-VP); `prediction` overrides what a plain network outputs. The result is
    a `jax.tree_util.Partial` with `params` (and the class labels `y`, shape (batch,), of a
    class-conditional network; None selects its null class) as leaves, so samplers compile once for
    all parameters and labels, and `score_fn(x, t)` stays the contract every sampler relies on.
    """
    precond = resolve_precond(sde, precond, prediction, continuous)
    return Partial(NetworkScore(sde, apply_fn, precond, bool(train)), params, rng, y=y)
