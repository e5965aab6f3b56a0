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

Guided CD (latent consistency models, Luo et al. 2023): each example draws w ~ U[w_min, w_max]; the
teacher step uses the CFG score s̃ = s(x, σ | y) + w(s(x, σ | y) − s(x, σ)) (`sdejax.guidance.cfg`'s
convention), and student and target are conditioned on (y, w): f_θ(x, σ; y, w). Skipping step k:
levels n and n + k (n ∈ {0 … N−1−k}), the teacher crossing k Karras levels in one solver step.
Plain CD is the case w = 0, k = 1 without conditioning.
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

    def __call__(self, params: Any, rng: Array | None, x: Array, sigma: Array, **cond: Array) -> Array:
        net = lambda x_in, labels: self.apply_fn(params, x_in, labels, train=self.train, rng=rng, **cond)
        return self.precond.apply(net, EDMSDE(), x, sigma)[0]


def get_consistency_fn(apply_fn: ApplyFn, params: Any, sigma_min: float = 0.002, sigma_data: float = 0.5,
                       train: bool = False, rng: Array | None = None, **cond: Array) -> Partial:
    """`f(x, sigma)` (sigma of shape (batch,)) of the network with params `params`; `cond` (e.g. y=
    classes, w= guidance weights, each (batch,)) rides in the Partial and reaches `apply_fn`."""
    return Partial(ConsistencyFn(apply_fn, Precond.consistency(sigma_data, sigma_min), bool(train)), params, rng,
                   **cond)


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
                  rho: float = 7.0, p_mean: float = -1.1, p_std: float = 2.0, skip: int = 1) -> Array:
    """Level indices in {0 … N−1−k} (k = `skip`) from u ~ U[0, 1): ⌊u(N−k)⌋ ("uniform"), or ("lognormal")
    the level interval [σ_n, σ_{n+1}) holding σ* = exp(P_mean + P_std Φ⁻¹(v)), v uniform on [Φ(σ_min),
    Φ(σ_max)), which has probability `lognormal_level_probs` (for k > 1 clipped to N−1−k). `n` may be traced."""
    nf = jnp.asarray(n, u.dtype)
    if how == "uniform":
        pos = u * (nf - skip)
    elif how == "lognormal":
        c_lo, c_hi = (_lognormal_cdf(jnp.asarray(s, u.dtype), p_mean, p_std) for s in (sigma_min, sigma_max))
        star = jnp.exp(p_mean + p_std * ndtri(c_lo + u * (c_hi - c_lo)))
        lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
        pos = (jnp.clip(star, sigma_min, sigma_max) ** (1 / rho) - lo) / (hi - lo) * (nf - 1)
    else:
        raise ValueError(f"unknown level sampling {how!r}; valid: {list(LEVEL_SAMPLINGS)}")
    return jnp.clip(jnp.floor(pos), 0, nf - 1 - skip).astype(jnp.int32)


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


def _guidance_weights(keys: Array, guidance: tuple[float, float], dtype: Any) -> Array:
    """w ~ U[w_min, w_max] per example from fold_in(key, 2) of its level key (w_min exactly when equal)."""
    w_min, w_max = guidance
    u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 2), (), dtype))(keys)
    return w_min + (w_max - w_min) * u


def _guided_score(score_fn: Callable[..., Array], y: Array, w: Array, x: Array, sigma: Array) -> Array:
    """s̃ = s_c + w(s_c − s_u), s_c = score_fn(x, σ, y=y), s_u = score_fn(x, σ, y=None), w per example."""
    s_c = score_fn(x, sigma, y=y)
    return s_c + batch_broadcast(w, x) * (s_c - score_fn(x, sigma, y=None))


def _check_guidance(guidance: tuple[float, float] | None, teacher: Any, skip: int, num_scales: Any) -> None:
    if guidance is not None and (teacher is None or len(guidance) != 2 or guidance[0] > guidance[1]):
        raise ValueError(f"guidance must be (w_min, w_max) with w_min <= w_max and needs a teacher; got {guidance!r}")
    if isinstance(skip, bool) or int(skip) != skip or skip < 1 or (not callable(num_scales) and skip > num_scales - 1):
        raise ValueError(f"skip must be an integer in [1, num_scales - 1]; got {skip!r}")


def consistency_objective(apply_fn: ApplyFn, num_scales: int | Callable[[Array], Array], *,
                          teacher: Callable[[Any], ScoreFn] | None = None, solver: str | Solver = "heun",
                          target: str = "ema", distance_kind: str = "l2", huber_c: float | None = None,
                          weighting: str = "uniform", level_sampling: str = "uniform", sigma_min: float = 0.002,
                          sigma_max: float = 80.0, sigma_data: float = 0.5, rho: float = 7.0,
                          p_mean: float = -1.1, p_std: float = 2.0, train: bool = True,
                          guidance: tuple[float, float] | None = None, skip: int = 1,
                          student_sees_w: bool = True) -> Callable:
    """`objective(params, rng, batch, context) -> (loss, aux)` of the module docstring: CD with a
    `teacher(context.teacher_params) -> score_fn(x, σ)`, CT without one. `num_scales` is N or N(step).
    `guidance=(w_min, w_max)`: guided CD on `batch["y"]`, the teacher's score_fn(x, σ, y=) class-
    conditional (y=None: unconditional), `apply_fn` called with y= and w= (`student_sees_w=False`: y= only,
    a student without a w-embedding, as LCM-LoRA at a fixed w). `skip` = k (levels n, n + k).
    aux: per-example weighted "losses", the student's "sigma" σ_{n+k}, "sigma_target" σ_n, "num_scales"
    (and "w" when guided)."""
    for name, value, valid in (("target", target, TARGETS), ("distance", distance_kind, DISTANCES),
                               ("weighting", weighting, WEIGHTINGS), ("level sampling", level_sampling,
                                                                      LEVEL_SAMPLINGS)):
        _check_choice(name, value, valid)
    if isinstance(solver, str):
        _check_choice("solver", solver, tuple(SOLVERS))
        solver = SOLVERS[solver]
    _check_guidance(guidance, teacher, skip, num_scales)
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
        idx = sample_levels(u, n, level_sampling, p_mean=p_mean, p_std=p_std, skip=skip, **levels)
        s_lo, s_hi = (karras_sigma(i, n, dtype=x0.dtype, **levels) for i in (idx, idx + skip))
        z = _per_example_normal(z_keys, x0)
        x_hi = x0 + batch_broadcast(s_hi, x0) * z
        cond, aux = {}, {}
        if guidance is not None:
            if "y" not in batch:
                raise ValueError(f"guided CD needs the classes batch['y']; got keys {sorted(batch)}")
            w = _guidance_weights(u_keys, guidance, x0.dtype)
            cond, aux = ({"y": batch["y"], "w": w} if student_sees_w else {"y": batch["y"]}), {"w": w}
        if teacher is None:
            x_lo = x0 + batch_broadcast(s_lo, x0) * z
        else:
            score = teacher(context.teacher_params)
            score = score if guidance is None else Partial(_guided_score, score, batch["y"], aux["w"])
            x_lo = solver(score, x_hi, s_hi, s_lo)
        theta_minus = _target_params(params, context, target)
        student = f(params, net_rng, x_hi, s_hi, **cond)
        target_out = jax.lax.stop_gradient(f(theta_minus, net_rng, jax.lax.stop_gradient(x_lo), s_lo, **cond))
        weight = 1.0 / (s_hi - s_lo) if weighting == "inverse_step" else jnp.ones_like(s_hi)
        losses = weight * distance(student, target_out, distance_kind, huber_c)
        return jnp.mean(losses), {"losses": losses, "sigma": s_hi, "sigma_target": s_lo, "num_scales": n, **aux}

    return objective


def cd_objective(apply_fn: ApplyFn, teacher: Callable[[Any], ScoreFn], num_scales: int = 18,
                 solver: str | Solver = "heun", distance_kind: str = "l2", target: str = "ema", **kwargs) -> Callable:
    """Consistency distillation (CM paper: N = 18, Heun, θ⁻ the EMA of θ)."""
    return consistency_objective(apply_fn, num_scales, teacher=teacher, solver=solver, target=target,
                                 distance_kind=distance_kind, **kwargs)


def guided_cd_objective(apply_fn: ApplyFn, teacher: Callable[[Any], Callable[..., Array]],
                        w_range: tuple[float, float] = (2.0, 14.0), skip: int = 1, num_scales: int = 18,
                        solver: str | Solver = "heun", **kwargs) -> Callable:
    """Guided CD (LCM: w ~ U[w_min, w_max], skipping step k; `consistency_objective` with `guidance`).
    LCM's ε̃ = (1 + ω)ε_c − ω ε_u is this w (default: its range [2, 14])."""
    return cd_objective(apply_fn, teacher, num_scales, solver, guidance=tuple(w_range), skip=skip, **kwargs)


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
           "get_consistency_fn", "guided_cd_objective", "heun_step", "ict_num_scales", "ict_objective", "karras_sigma",
           "lognormal_level_probs", "sample_levels"]
