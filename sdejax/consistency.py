"""Consistency models (Song et al. 2023, "Consistency Models"; Song & Dhariwal 2023, "Improved
Techniques for Training Consistency Models"): the consistency function and the CD, CT and iCT
objectives, in EDM's variables (α = 1, σ_t = t; `sdejax.sde.EDMSDE`).

    f_θ(x, σ) = c_skip(σ) x + c_out(σ) F_θ(c_in(σ) x, ¼ ln σ)          (`Precond.consistency`)

with c_skip = σ_d²/((σ − σ_min)² + σ_d²), c_out = σ_d(σ − σ_min)/sqrt(σ² + σ_d²), so f(x, σ_min) = x.

Levels (ascending Karras, `grids.karras` reversed): σ_i = (σ_min^{1/ρ} + i/(N−1)(σ_max^{1/ρ} − σ_min^{1/ρ}))^ρ,
i = 0 … N−1. For a level n ∈ {0 … N−2} and z ~ N(0, I) each example's loss is

    λ(σ_n) d(f_θ(x + σ_{n+1} z, σ_{n+1}), sg f_θ⁻(x̂_n, σ_n))

    CD:  x̂_n = one step σ_{n+1} → σ_n of the teacher's PF-ODE dx/dσ = −σ ∇log p_σ(x) ("euler", "heun")
    CT:  x̂_n = x + σ_n z (the same z; the Euler step with the clean x as the teacher's denoiser)

θ⁻ is `context.target_params` (an EMA of θ at rate μ(k), kept by the driver) or sg(θ) ("student", iCT).
Both calls share the network's dropout key. d is "l2" (mean of squares), "l1" (mean of |·|) or
"pseudo_huber" sqrt(‖a − b‖² + c²) − c on the whole example, c = 0.00054 sqrt(dim). λ is "uniform"
(1) or "inverse_step" (1/(σ_{n+1} − σ_n), iCT). n ~ U{0 … N−2} ("uniform") or, iCT's "lognormal",
p(n) ∝ erf((ln σ_{n+1} − P_mean)/(√2 P_std)) − erf((ln σ_n − P_mean)/(√2 P_std)).

Schedules of the step k out of K: CT's N(k) = ⌈sqrt(k/K((s₁+1)² − s₀²) + s₀²) − 1⌉ + 1 (s₀ = 2,
s₁ = 150) and μ(k) = exp(s₀ ln μ₀ / N(k)) (the paper; the reference code divides by N(k) − 1);
iCT's N(k) = min(s₀ 2^⌊k/K'⌋, s₁) + 1, K' = ⌊K/(log₂⌊s₁/s₀⌋ + 1)⌋ (s₀ = 10, s₁ = 1280).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import ndtr, ndtri
from jax.tree_util import Partial

from sdejax.losses import _check_batch, _example_keys, _per_example_normal
from sdejax.precond import Precond
from sdejax.sde import EDMSDE, ScoreFn, batch_broadcast

Array = jax.Array
ApplyFn = Callable[..., Array]
Solver = Callable[[ScoreFn, Array, Array, Array], Array]
DISTANCES = ("l2", "l1", "pseudo_huber")
WEIGHTINGS = ("uniform", "inverse_step")
LEVEL_SAMPLINGS = ("uniform", "lognormal")
TARGETS = ("ema", "student")
EMA_CONVENTIONS = ("paper", "reference")


# The consistency function ------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ConsistencyFn:
    """f_θ(x, σ) of a network `apply_fn(params, x_in, labels, *, train, rng)` (module docstring);
    hashable, so `get_consistency_fn` hands samplers a `Partial` whose leaves are params and key."""

    apply_fn: ApplyFn
    precond: Precond
    train: bool = False

    def __call__(self, params: Any, rng: Array | None, x: Array, sigma: Array) -> Array:
        net = lambda x_in, labels: self.apply_fn(params, x_in, labels, train=self.train, rng=rng)
        return self.precond.apply(net, EDMSDE(), x, sigma)[0]


def get_consistency_fn(apply_fn: ApplyFn, params: Any, sigma_min: float = 0.002, sigma_data: float = 0.5,
                       train: bool = False, rng: Array | None = None) -> Partial:
    """`f(x, sigma)` (sigma of shape (batch,)) of the network with params `params`."""
    return Partial(ConsistencyFn(apply_fn, Precond.consistency(sigma_data, sigma_min), bool(train)), params, rng)


# Levels and their sampling -----------------------------------------------------------------------
def karras_sigma(i: Array, n: Array, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                 dtype: Any = jnp.float32) -> Array:
    """σ_i of the ascending N-level Karras grid; `i` and `n` may be traced integers."""
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    frac = jnp.asarray(i, dtype) / (jnp.asarray(n, dtype) - 1)
    return (lo + frac * (hi - lo)) ** rho


def _lognormal_cdf(sigma: Array, p_mean: float, p_std: float) -> Array:
    return ndtr((jnp.log(sigma) - p_mean) / p_std)


def lognormal_level_probs(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                          p_mean: float = -1.1, p_std: float = 2.0) -> np.ndarray:
    """iCT's p(n), n = 0 … N−2: the mass of ln σ ~ N(P_mean, P_std²) on [σ_n, σ_{n+1}), normalised (float64)."""
    sig = (sigma_min ** (1 / rho) + np.linspace(0, 1, n) * (sigma_max ** (1 / rho) - sigma_min ** (1 / rho))) ** rho
    cdf = np.array([0.5 * (1 + math.erf((math.log(s) - p_mean) / (math.sqrt(2) * p_std))) for s in sig])
    return np.diff(cdf) / (cdf[-1] - cdf[0])


def sample_levels(u: Array, n: Array, how: str = "uniform", sigma_min: float = 0.002, sigma_max: float = 80.0,
                  rho: float = 7.0, p_mean: float = -1.1, p_std: float = 2.0) -> Array:
    """Level indices in {0 … N−2} from u ~ U[0, 1): ⌊u(N−1)⌋ ("uniform"), or ("lognormal") the level
    interval [σ_n, σ_{n+1}) holding σ* = exp(P_mean + P_std Φ⁻¹(v)), v uniform on [Φ(σ_min), Φ(σ_max)),
    which has probability `lognormal_level_probs`. `n` may be traced."""
    nf = jnp.asarray(n, u.dtype)
    if how == "uniform":
        pos = u * (nf - 1)
    elif how == "lognormal":
        c_lo, c_hi = (_lognormal_cdf(jnp.asarray(s, u.dtype), p_mean, p_std) for s in (sigma_min, sigma_max))
        star = jnp.exp(p_mean + p_std * ndtri(c_lo + u * (c_hi - c_lo)))
        lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
        pos = (jnp.clip(star, sigma_min, sigma_max) ** (1 / rho) - lo) / (hi - lo) * (nf - 1)
    else:
        raise ValueError(f"unknown level sampling {how!r}; valid: {list(LEVEL_SAMPLINGS)}")
    return jnp.clip(jnp.floor(pos), 0, nf - 2).astype(jnp.int32)


# Schedules of the step k --------------------------------------------------------------------------
def ct_num_scales(step: Array, total_steps: int, s0: int = 2, s1: int = 150) -> Array:
    """CT's N(k) = ⌈sqrt(k/K((s₁+1)² − s₀²) + s₀²) − 1⌉ + 1 (s₀ at k = 0, s₁ + 1 at k = K)."""
    k = jnp.minimum(jnp.asarray(step, jnp.float32), total_steps)
    return (jnp.ceil(jnp.sqrt(k / total_steps * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1) + 1).astype(jnp.int32)


def ct_ema_rate(step: Array, total_steps: int, mu0: float = 0.9, s0: int = 2, s1: int = 150,
                convention: str = "paper") -> Array:
    """CT's target EMA rate μ(k) = exp(s₀ ln μ₀ / N(k)) ("paper": μ(0) = μ₀), or exp(s₀ ln μ₀ / (N(k) − 1))
    ("reference": the released code's pre-increment N, μ(0) = μ₀²)."""
    if convention not in EMA_CONVENTIONS:
        raise ValueError(f"unknown EMA convention {convention!r}; valid: {list(EMA_CONVENTIONS)}")
    n = ct_num_scales(step, total_steps, s0, s1).astype(jnp.float32)
    return jnp.exp(s0 * math.log(mu0) / (n if convention == "paper" else n - 1))


def ict_num_scales(step: Array, total_steps: int, s0: int = 10, s1: int = 1280) -> Array:
    """iCT's N(k) = min(s₀ 2^⌊k/K'⌋, s₁) + 1, K' = ⌊K/(log₂⌊s₁/s₀⌋ + 1)⌋ (11, 21, …, 1281)."""
    stage_len = max(int(total_steps / (math.log2(s1 // s0) + 1)), 1)
    stage = jnp.minimum(jnp.asarray(step, jnp.int32) // stage_len, int(math.ceil(math.log2(s1 / s0))) + 1)
    return jnp.minimum(s0 * 2**stage, s1).astype(jnp.int32) + 1


# Distances and teacher steps ----------------------------------------------------------------------
def distance(a: Array, b: Array, kind: str = "l2", c: float | None = None) -> Array:
    """Per-example d(a, b): mean (a − b)² ("l2"), mean |a − b| ("l1"), or sqrt(‖a − b‖² + c²) − c
    ("pseudo_huber", the norm over the whole example, c = 0.00054 sqrt(dim) by default)."""
    diff = jnp.reshape(a - b, (a.shape[0], -1))
    if kind == "l2":
        return jnp.mean(jnp.square(diff), axis=-1)
    if kind == "l1":
        return jnp.mean(jnp.abs(diff), axis=-1)
    if kind == "pseudo_huber":
        c = 0.00054 * math.sqrt(diff.shape[1]) if c is None else c
        return jnp.sqrt(jnp.sum(jnp.square(diff), axis=-1) + c**2) - c
    raise ValueError(f"unknown distance {kind!r}; valid: {list(DISTANCES)}")


def _velocity(score_fn: ScoreFn, x: Array, sigma: Array) -> Array:
    """dx/dσ = −σ ∇log p_σ(x) (EDM: t = σ)."""
    return -batch_broadcast(sigma, x) * score_fn(x, sigma)


def euler_step(score_fn: ScoreFn, x: Array, sigma: Array, sigma_to: Array) -> Array:
    """x + (σ' − σ) v(x, σ)."""
    return x + batch_broadcast(sigma_to - sigma, x) * _velocity(score_fn, x, sigma)


def heun_step(score_fn: ScoreFn, x: Array, sigma: Array, sigma_to: Array) -> Array:
    """x + (σ' − σ)(v(x, σ) + v(x_E, σ'))/2, x_E the Euler step (σ' ≥ σ_min > 0)."""
    v = _velocity(score_fn, x, sigma)
    h = batch_broadcast(sigma_to - sigma, x)
    return x + h * 0.5 * (v + _velocity(score_fn, x + h * v, sigma_to))


SOLVERS: dict[str, Solver] = {"euler": euler_step, "heun": heun_step}


# Objectives ------------------------------------------------------------------------------------
def _check_choice(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid: {list(valid)}")


def _target_params(params: Any, context: Any, target: str) -> Any:
    if target == "student":
        return jax.lax.stop_gradient(params)
    if context.target_params is None:
        raise ValueError("target='ema' reads context.target_params (the EMA of the student), which is None")
    return context.target_params


def consistency_objective(apply_fn: ApplyFn, num_scales: int | Callable[[Array], Array], *,
                          teacher: Callable[[Any], ScoreFn] | None = None, solver: str | Solver = "heun",
                          target: str = "ema", distance_kind: str = "l2", huber_c: float | None = None,
                          weighting: str = "uniform", level_sampling: str = "uniform", sigma_min: float = 0.002,
                          sigma_max: float = 80.0, sigma_data: float = 0.5, rho: float = 7.0,
                          p_mean: float = -1.1, p_std: float = 2.0, train: bool = True) -> Callable:
    """`objective(params, rng, batch, context) -> (loss, aux)` of the module docstring: CD with a
    `teacher(context.teacher_params) -> score_fn(x, σ)`, CT without one. `num_scales` is N or N(step).
    aux: per-example weighted "losses", the student's "sigma" σ_{n+1}, "sigma_target" σ_n, "num_scales"."""
    for name, value, valid in (("target", target, TARGETS), ("distance", distance_kind, DISTANCES),
                               ("weighting", weighting, WEIGHTINGS), ("level sampling", level_sampling,
                                                                      LEVEL_SAMPLINGS)):
        _check_choice(name, value, valid)
    if isinstance(solver, str):
        _check_choice("solver", solver, tuple(SOLVERS))
        solver = SOLVERS[solver]
    if not callable(num_scales) and (isinstance(num_scales, bool) or int(num_scales) != num_scales or num_scales < 2):
        raise ValueError(f"num_scales must be an integer >= 2 (levels incl. sigma_min and sigma_max) or a function "
                         f"of the step; got {num_scales!r}")
    n_fn = num_scales if callable(num_scales) else (lambda step, n=int(num_scales): jnp.asarray(n, jnp.int32))
    f = ConsistencyFn(apply_fn, Precond.consistency(sigma_data, sigma_min), bool(train))
    levels = dict(sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)

    def objective(params: Any, rng: Array, batch: dict, context: Any) -> tuple[Array, dict]:
        x0 = _check_batch(batch)
        u_keys, z_keys, net_rng = _example_keys(rng, batch)
        n = n_fn(context.step)
        u = jax.vmap(lambda k: jax.random.uniform(k, (), x0.dtype))(u_keys)
        idx = sample_levels(u, n, level_sampling, p_mean=p_mean, p_std=p_std, **levels)
        s_lo, s_hi = (karras_sigma(i, n, dtype=x0.dtype, **levels) for i in (idx, idx + 1))
        z = _per_example_normal(z_keys, x0)
        x_hi = x0 + batch_broadcast(s_hi, x0) * z
        if teacher is None:
            x_lo = x0 + batch_broadcast(s_lo, x0) * z
        else:
            x_lo = solver(teacher(context.teacher_params), x_hi, s_hi, s_lo)
        theta_minus = _target_params(params, context, target)
        student = f(params, net_rng, x_hi, s_hi)
        target_out = jax.lax.stop_gradient(f(theta_minus, net_rng, jax.lax.stop_gradient(x_lo), s_lo))
        weight = 1.0 / (s_hi - s_lo) if weighting == "inverse_step" else jnp.ones_like(s_hi)
        losses = weight * distance(student, target_out, distance_kind, huber_c)
        return jnp.mean(losses), {"losses": losses, "sigma": s_hi, "sigma_target": s_lo, "num_scales": n}

    return objective


def cd_objective(apply_fn: ApplyFn, teacher: Callable[[Any], ScoreFn], num_scales: int = 18,
                 solver: str | Solver = "heun", distance_kind: str = "l2", target: str = "ema", **kwargs) -> Callable:
    """Consistency distillation (CM paper: N = 18, Heun, θ⁻ the EMA of θ)."""
    return consistency_objective(apply_fn, num_scales, teacher=teacher, solver=solver, target=target,
                                 distance_kind=distance_kind, **kwargs)


def ct_objective(apply_fn: ApplyFn, total_steps: int, s0: int = 2, s1: int = 150, distance_kind: str = "l2",
                 **kwargs) -> Callable:
    """Consistency training (CM paper): no teacher, N(k) = `ct_num_scales`, θ⁻ the EMA at `ct_ema_rate`."""
    return consistency_objective(apply_fn, lambda step: ct_num_scales(step, total_steps, s0, s1),
                                 distance_kind=distance_kind, **kwargs)


def ict_objective(apply_fn: ApplyFn, total_steps: int, s0: int = 10, s1: int = 1280, **kwargs) -> Callable:
    """Improved CT: pseudo-Huber, log-normal levels, λ = 1/(σ_{n+1} − σ_n), θ⁻ = sg(θ), N(k) = `ict_num_scales`."""
    options = dict(target="student", distance_kind="pseudo_huber", weighting="inverse_step",
                   level_sampling="lognormal")
    return consistency_objective(apply_fn, lambda step: ict_num_scales(step, total_steps, s0, s1),
                                 **{**options, **kwargs})


__all__ = ["ConsistencyFn", "DISTANCES", "LEVEL_SAMPLINGS", "SOLVERS", "TARGETS", "WEIGHTINGS", "cd_objective",
           "consistency_objective", "ct_ema_rate", "ct_num_scales", "ct_objective", "distance", "euler_step",
           "get_consistency_fn", "heun_step", "ict_num_scales", "ict_objective", "karras_sigma",
           "lognormal_level_probs", "sample_levels"]
