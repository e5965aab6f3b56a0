"""Progressive distillation (Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of
Diffusion Models"): a student whose one DDIM step matches two DDIM steps of its teacher, halved
stage after stage, for any linear schedule z_t = α_t x + σ_t ε (`SDE.marginal_coeffs`).

Grid of a student with N steps on [eps, T]: τ(u) = eps + u (T − eps), u_i = i/N (i = 0 … N), so its
DDIM sampler is `ddim_sample(num_steps=N + 1, eps=eps)`. For a level i ∈ {1 … N} (uniform),
t = τ(i/N), t' = τ(i/N − 1/(2N)), t'' = τ(i/N − 1/N), and z_t = α_t x + σ_t ε:

    teacher (η = 0):  z_{t'} = DDIM(z_t, x̂₀^η(z_t, t); t → t'),  z_{t''} = DDIM(z_{t'}, x̂₀^η(z_{t'}, t'); t' → t'')
    x-space target:   x̃ = (z_{t''} − (σ_{t''}/σ_t) z_t) / (α_{t''} − (σ_{t''}/σ_t) α_t)
    loss:             w(t) · mean((x̂₀^θ(z_t, t) − x̃)²),   w = max(SNR_t, 1), SNR = α_t²/σ_t²

x̃ is the x̂₀ for which one student DDIM step t → t'' lands on the teacher's z_{t''} (its DDIM map
z'' = (σ''/σ) z + (α'' − (σ''/σ) α) x̂₀ solved for x̂₀). The regression is in x-space because an ε
target ε̃ = (z_t − α_t x̃)/σ_t divides by σ_t → 0 at small t (a v target likewise), while an
ε-network's x̂₀ = (z − σ ε̂)/α amplifies its errors by 1/α at t → T of a VP schedule. The
weight is the paper's "truncated SNR" (its Sec. 4): ‖x − x̂‖² weighted by max(α²/σ², 1), i.e.
max(‖x − x̂‖², ‖ε − ε̂‖²) since ε − ε̂ = −(α/σ)(x − x̂); "uniform" is w = 1 (‖x − x̂‖²).

Networks are x̂₀ predictors read through their preconditioner (`X0Fn`). Stages (the driver):
stage s = ⌊k/K⌋ of the step k, K steps per stage; the student has N(k) = N₀/2^(s+1) steps
(N₀ the first teacher's steps) and the teacher θ⁻ is replaced by θ after the last step of each stage
(`pd_target_rate`: μ = 0 there, 1 elsewhere, in θ⁻ ← μθ⁻ + (1 − μ)θ).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from sdejax.losses import _check_batch, _example_keys, _per_example_normal
from sdejax.precond import Precond
from sdejax.sampling.ddim import ddim_step
from sdejax.score import NetworkScore
from sdejax.sde import SDE, batch_broadcast

Array = jax.Array
ApplyFn = Callable[..., Array]
X0Fn = Callable[[Array, Array], Array]
WEIGHTINGS = ("truncated_snr", "uniform")


def grid_time(sde: SDE, u: Array, eps: float) -> Array:
    """τ(u) = eps + u (T − eps): u = 0 is the last time eps, u = 1 the prior time T."""
    return eps + u * (sde.T - eps)


def pd_times(sde: SDE, i: Array, n: Array, eps: float, dtype: Any = jnp.float32) -> tuple[Array, Array, Array]:
    """(t, t', t'') = τ(i/N), τ(i/N − 1/(2N)), τ(i/N − 1/N) of level i ∈ {1 … N}; i, N may be traced."""
    i, n = jnp.asarray(i, dtype), jnp.asarray(n, dtype)
    return tuple(grid_time(sde, (i - d) / n, eps) for d in (0.0, 0.5, 1.0))


def ddim0(sde: SDE, z: Array, x0: Array, t: Array, s: Array) -> Array:
    """The deterministic DDIM step t → s: α_s x̂₀ + σ_s (z − α_t x̂₀)/σ_t."""
    return ddim_step(sde, z, x0, t, s, 0.0, jnp.zeros_like(z))


def teacher_two_steps(sde: SDE, x0_fn: X0Fn, z: Array, t: Array, t_mid: Array, t_end: Array) -> Array:
    """z_{t''} of two teacher DDIM steps z_t → z_{t'} → z_{t''}, x̂₀ from `x0_fn(x, t)`."""
    z_mid = ddim0(sde, z, x0_fn(z, t), t, t_mid)
    return ddim0(sde, z_mid, x0_fn(z_mid, t_mid), t_mid, t_end)


def x_target(sde: SDE, z: Array, z_end: Array, t: Array, t_end: Array) -> Array:
    """x̃ = (z_{t''} − (σ_{t''}/σ_t) z_t) / (α_{t''} − (σ_{t''}/σ_t) α_t): the x̂₀ whose DDIM step t → t''
    from z_t is z_{t''}."""
    a_t, s_t = (batch_broadcast(v, z) for v in sde.marginal_coeffs(t))
    a_e, s_e = (batch_broadcast(v, z) for v in sde.marginal_coeffs(t_end))
    r = s_e / s_t
    return (z_end - r * z) / (a_e - r * a_t)


def pd_weight(sde: SDE, t: Array, weighting: str = "truncated_snr") -> Array:
    """w(t) on the x-space error: max(α_t²/σ_t², 1) ("truncated_snr", the paper's) or 1 ("uniform")."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; valid: {list(WEIGHTINGS)}")
    alpha, sigma = sde.marginal_coeffs(t)
    return jnp.maximum((alpha / sigma) ** 2, 1.0) if weighting == "truncated_snr" else jnp.ones_like(t)


# Stage schedule of the step k ----------------------------------------------------------------------
def _check_schedule(teacher_steps: int, steps_per_stage: int) -> None:
    if teacher_steps < 2 or teacher_steps & (teacher_steps - 1):
        raise ValueError(f"teacher_steps must be a power of two >= 2; got {teacher_steps!r}")
    if steps_per_stage < 1:
        raise ValueError(f"steps_per_stage must be >= 1; got {steps_per_stage!r}")


def num_stages(teacher_steps: int) -> int:
    """log₂ N₀: the halvings N₀ → N₀/2 → … → 1."""
    _check_schedule(teacher_steps, 1)
    return teacher_steps.bit_length() - 1


def pd_stage(step: Array, steps_per_stage: int, teacher_steps: int) -> Array:
    """s = min(⌊k/K⌋, log₂ N₀ − 1): steps past the last stage keep training the 1-step student."""
    _check_schedule(teacher_steps, steps_per_stage)
    return jnp.minimum(jnp.asarray(step, jnp.int32) // steps_per_stage, num_stages(teacher_steps) - 1)


def pd_num_steps(step: Array, steps_per_stage: int, teacher_steps: int) -> Array:
    """The student's steps N(k) = N₀ / 2^(s+1), s = `pd_stage`."""
    return (teacher_steps // 2 ** (pd_stage(step, steps_per_stage, teacher_steps) + 1)).astype(jnp.int32)


def pd_target_rate(step: Array, steps_per_stage: int) -> Array:
    """μ(k) of θ⁻ ← μθ⁻ + (1 − μ)θ after step k: 0 (the teacher becomes the student) when k + 1 ends a
    stage, else 1 (the teacher is frozen)."""
    last = (jnp.asarray(step, jnp.int32) + 1) % steps_per_stage == 0
    return jnp.where(last, 0.0, 1.0).astype(jnp.float32)


# The objective --------------------------------------------------------------------------------------
def pd_objective(apply_fn: ApplyFn, sde: SDE, precond: Precond, num_steps: int | Callable[[Array], Array], *,
                 teacher: Callable[[Any], X0Fn] | None = None, eps: float | None = None,
                 weighting: str = "truncated_snr", train: bool = True) -> Callable:
    """`objective(params, rng, batch, context) -> (loss, aux)` of the module docstring. The teacher
    is `teacher(context.teacher_params) -> x0_fn(x, t)`, or (None) the student's network in eval mode
    with `context.target_params` (the driver's θ⁻). `num_steps` is the student's N or N(step);
    `eps` the last time (default `sde.sampling_eps`). aux: per-example weighted "losses", "t", "level"
    i, "num_steps" N."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; valid: {list(WEIGHTINGS)}")
    if not callable(num_steps) and (isinstance(num_steps, bool) or int(num_steps) != num_steps or num_steps < 1):
        raise ValueError(f"num_steps must be an integer >= 1 or a function of the step; got {num_steps!r}")
    n_fn = num_steps if callable(num_steps) else (lambda step, n=int(num_steps): jnp.asarray(n, jnp.int32))
    eps = float(sde.sampling_eps if eps is None else eps)
    student = NetworkScore(sde, apply_fn, precond, bool(train), kind="x0")
    frozen = NetworkScore(sde, apply_fn, precond, kind="x0")

    def teacher_fn(context: Any) -> X0Fn:
        if teacher is not None:
            return teacher(context.teacher_params)
        if context.target_params is None:
            raise ValueError("pd_objective without a teacher reads context.target_params (the teacher θ⁻), "
                             "which is None")
        return lambda x, t: frozen(context.target_params, None, x, t)

    def objective(params: Any, rng: Array, batch: dict, context: Any) -> tuple[Array, dict]:
        x0 = _check_batch(batch)
        u_keys, z_keys, net_rng = _example_keys(rng, batch)
        n = n_fn(context.step)
        u = jax.vmap(lambda k: jax.random.uniform(k, (), x0.dtype))(u_keys)
        level = jnp.clip(jnp.floor(u * n) + 1, 1, n).astype(jnp.int32)
        t, t_mid, t_end = pd_times(sde, level, n, eps, x0.dtype)
        alpha, sigma = (batch_broadcast(v, x0) for v in sde.marginal_coeffs(t))
        z = alpha * x0 + sigma * _per_example_normal(z_keys, x0)
        z_end = teacher_two_steps(sde, teacher_fn(context), z, t, t_mid, t_end)
        target = jax.lax.stop_gradient(x_target(sde, z, z_end, t, t_end))
        err = jnp.reshape(student(params, net_rng, z, t) - target, (x0.shape[0], -1))
        losses = pd_weight(sde, t, weighting) * jnp.mean(jnp.square(err), axis=-1)
        return jnp.mean(losses), {"losses": losses, "t": t, "level": level, "num_steps": n}

    return objective


__all__ = ["WEIGHTINGS", "ddim0", "grid_time", "num_stages", "pd_num_steps", "pd_objective",
           "pd_stage", "pd_target_rate", "pd_times", "pd_weight", "teacher_two_steps", "x_target"]
