"""EDM's sampler (Karras et al., 2022, Alg. 2): Euler or Heun in σ̃ with optional churn, for any linear SDE.

In the scaled variables x̃ = x/α_t, σ̃ = σ_t/α_t every linear SDE's probability-flow ODE is

    dx̃/dσ̃ = (x̃ − D(x̃; σ̃))/σ̃,   D = x̂₀ (Tweedie, evaluated at x = α x̃).

Step i (σ̃_i → σ̃_{i+1}): churn raises σ̃_i to σ̂ = σ̃_i(1 + γ_i), γ_i = min(S_churn/n, √2 − 1) where
S_tmin ≤ σ̃_i ≤ S_tmax (else 0), and adds noise: x̃ ← x̃ + sqrt(σ̂² − σ̃_i²) S_noise z. Then Euler,
x̃' = x̃ + (σ̃_{i+1} − σ̂) d with d = (x̃ − D(x̃; σ̂))/σ̂, and Heun's correction
x̃_{i+1} = x̃ + (σ̃_{i+1} − σ̂)(d + d')/2 with d' at (x̃', σ̃_{i+1}).

- n = len(ts) is EDM's number of noise levels above zero (its grid σ_0 … σ_{N−1} and σ_N = 0), so
  S_churn/n is EDM's S_churn/N and published settings (S_churn = 40 on 256 steps) carry over.
- σ̂ is clamped to σ̃(T), the largest noise level the SDE has (EDM's grid starts below it); the time
  t̂ with σ̃(t̂) = σ̂ comes from `sde.t_from_log_snr`, computed once per grid.
- The step to σ = 0 is Euler, i.e. x̂₀ at t_{n−1} (`final`), without churn (EDM churns there only
  if σ_{N−1} ∈ [S_tmin, S_tmax]; with its S_tmin = 0.05 > σ_min it never does).
- Euler in σ̃ is DDIM (η = 0) and DPM-Solver++(1): (σ̃_{i+1}/σ̃_i) x̃ + (1 − σ̃_{i+1}/σ̃_i) D.
NFE = (1 + second_order)(n − 1) + [denoise]; 35 for Heun on n = 18 with denoise.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from sdejax.sampling.common import check_number
from sdejax.sampling.dpm_solver import denoised_final, x0_at
from sdejax.sde import SDE, ScoreFn

Array = jax.Array


class HeunPlan(NamedTuple):
    """Per grid point i: α_i, σ̃_i, the churned σ̂_i, its time t̂_i and α(t̂_i), and the churn noise
    scale sqrt(σ̂_i² − σ̃_i²)·S_noise."""

    alpha: Array
    sigma: Array
    sigma_hat: Array
    t_hat: Array
    alpha_hat: Array
    noise: Array


def sigma_tilde(sde: SDE, t: Array) -> Array:
    """σ̃(t) = σ_t/α_t."""
    alpha, sigma = sde.marginal_coeffs(t)
    return sigma / alpha


@dataclasses.dataclass(frozen=True)
class HeunSolver:
    """EDM's stochastic Heun sampler (module docstring); `second_order=False` is Euler in σ̃.

    With `s_churn = 0` (the default) it is deterministic. The churn noise of step i is
    z = normal(key_i) in the dtype of x.
    """

    second_order: bool = True
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = float("inf")
    s_noise: float = 1.0

    def __post_init__(self):
        for name in ("s_churn", "s_tmin", "s_noise"):
            check_number(name, getattr(self, name))
        if not self.s_tmax >= self.s_tmin:
            raise ValueError(f"s_tmax must be >= s_tmin; got s_tmax = {self.s_tmax!r} < s_tmin = {self.s_tmin!r}")

    def init(self, sde: SDE, score_fn: ScoreFn, x: Array, ts: Array) -> HeunPlan:
        alpha, sigma = sde.marginal_coeffs(ts)
        sig = sigma / alpha
        if not self.s_churn:
            return HeunPlan(alpha, sig, sig, ts, alpha, jnp.zeros_like(sig))
        in_range = (sig >= self.s_tmin) & (sig <= self.s_tmax)
        gamma = jnp.where(in_range, min(self.s_churn / ts.shape[0], math.sqrt(2.0) - 1.0), 0.0)
        sig_hat = jnp.minimum(sig * (1.0 + gamma), sigma_tilde(sde, jnp.asarray(sde.T, ts.dtype)))
        t_hat = jnp.where(sig_hat > sig, sde.t_from_log_snr(-2.0 * jnp.log(sig_hat)).astype(ts.dtype), ts)
        alpha_hat, _ = sde.marginal_coeffs(t_hat)
        var = sig_hat**2 - sig**2  # 0 where nothing is churned: sqrt kept off 0, so d/dts stays finite
        noise = jnp.where(var > 0, jnp.sqrt(jnp.where(var > 0, var, 1.0)), 0.0) * self.s_noise
        return HeunPlan(alpha, sig, sig_hat, t_hat, alpha_hat, noise)

    def step(self, sde: SDE, score_fn: ScoreFn, rng: Array, state: Any, x: Array, i: Array,
             ts: Array) -> tuple[Array, Any]:
        p = state
        xt = x / p.alpha[i]
        if self.s_churn:
            xt = xt + p.noise[i] * jax.random.normal(rng, x.shape, x.dtype)
        sig_hat, sig_next, a_next = p.sigma_hat[i], p.sigma[i + 1], p.alpha[i + 1]
        d = (xt - x0_at(sde, score_fn, p.alpha_hat[i] * xt, p.t_hat[i])) / sig_hat
        xt_next = xt + (sig_next - sig_hat) * d
        if self.second_order:
            d_next = (xt_next - x0_at(sde, score_fn, a_next * xt_next, ts[i + 1])) / sig_next
            xt_next = xt + (sig_next - sig_hat) * 0.5 * (d + d_next)
        return a_next * xt_next, state

    def final(self, sde: SDE, score_fn: ScoreFn, rng: Array, state: Any, x: Array, ts: Array,
              denoise: bool) -> Array:
        return denoised_final(sde, score_fn, x, ts, denoise)

    def nfe(self, n: int, denoise: bool) -> int:
        return (2 if self.second_order else 1) * (n - 1) + int(denoise)
