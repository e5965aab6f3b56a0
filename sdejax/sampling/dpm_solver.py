"""DPM-Solver++ (Lu et al., 2022) in data-prediction form, for any linear SDE x_t = α_t x₀ + σ_t z.

In the half-log-SNR λ = log α − log σ (increasing as sampling proceeds), with h = λ_t − λ_s > 0 and
D = x̂₀ (Tweedie), the probability-flow ODE and the marginal-preserving SDE family (η ≥ 0; η = 0
the ODE, η = 1 the reverse SDE) have the exact solution

    x_t = (σ_t/σ_s) e^{−ηh} x_s + α_t ∫_0^h (1+η) e^{−(1+η)(h−v)} D(λ_s + v) dv + σ_t sqrt(1 − e^{−2ηh}) z.

Replacing D by the polynomial Σ_k a_k u^k through the K latest data predictions D_j at
u_j = (λ_j − λ_s)/h (u_0 = 0, earlier points u_j < 0) integrates exactly:

    ∫ … = Σ_k w_k a_k,   w_k = k! ψ_{k+1}(H)/H^k,   H = (1+η)h,   ψ_1 = 1 − e^{−H},  ψ_{k+1} = H^k/k! − ψ_k,

(ψ_k(H) = H^k φ_k(−H), the exponential-integrator φ functions), so x_t = … + α_t Σ_j c_j D_j with
Vᵀc = w, V_jk = u_j^k (`exponential_weights`). K = 1 is DDIM (η = 0, 1) = DPM-Solver++(1); K = 2, 3
are the multistep 2M, 3M (exponential Adams–Bashforth, local error O(h^{K+1})).

Every coefficient depends on the grid only, so `init` computes them for all steps at once (a `Plan`)
and a step is one evaluation and a weighted sum.

- Warm-up: step i uses order min(order, i + 1). Its first-order first step has local error O(h²), so
  3M is third order only while that term, scaled by dD/dλ at the start (small: D ≈ E[x₀] at high
  noise), is below the O(h³) of the later steps; asymptotically 3M converges at order 2.
- Differences from the reference code (dpm-solver, k-diffusion, diffusers): 2M is this Taylor form,
  not their default 'midpoint' D̄ = (1 + 1/2r) D_s − D_prev/2r (O(h³) apart per step, both second
  order). Their 3M weights the second divided difference D2 = h²D''/2 by −φ₃ ≈ h/6 where the
  integral needs h/3, an O(h³) difference per step that makes it second order (on the Gaussian
  oracle of tests/test_fast_solvers.py, Karras grid, n = 64…256: slope 1.8–1.9; this 3M: 3.0–3.1).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from sdejax.sampling.common import check_number
from sdejax.sampling.loop import batch_time
from sdejax.score import tweedie_x0
from sdejax.sde import SDE, ScoreFn, check_per_example

Array = jax.Array
TableFn = Callable[[Array, Array], Array]  # (u, h) -> per-prefix weights (..., K, K)

# dpm-solver's threshold: `lower_order_final` lowers the order of the last steps only on grids of
# fewer than this many steps (diffusers uses 15; the UniPC repository always lowers).
LOWER_ORDER_FINAL_STEPS = 10


class Plan(NamedTuple):
    """Per-step coefficients of x_{i+1} = decay_i x_i + alpha_i Σ_j weights_ij D_j + noise_i z."""

    decay: Array  # (n−1,) σ_{i+1}/σ_i e^{−η h_i}
    alpha: Array  # (n−1,) α_{i+1}
    weights: Array  # (n−1, K), newest prediction first
    noise: Array  # (n−1,) σ_{i+1} sqrt(1 − e^{−2η h_i})


def half_log_snr(sde: SDE, t: Array) -> Array:
    """λ(t) = log α_t − log σ_t = log_snr(t)/2 (one per time: a per-dimension schedule is refused)."""
    return 0.5 * check_per_example(sde.log_snr(t), t, "DPM-Solver++ / UniPC (steps in the log-SNR)")


def phi_weights(big_h: Array, count: int) -> Array:
    """w_k = k! ψ_{k+1}(H)/H^k for k = 0 … count−1 (module docstring), stacked on a new last axis."""
    psi = -jnp.expm1(-big_h)
    weights = [psi]
    for k in range(1, count):
        psi = big_h**k / math.factorial(k) - psi
        weights.append(math.factorial(k) * psi / big_h**k)
    return jnp.stack(weights, axis=-1)


def prefix_weights(u: Array, big_h: Array) -> Array:
    """The weights of every prefix of the points u (last axis, K of them): row m − 1 holds the c of
    u_0 … u_{m−1} (zeros after), shape (..., K, K); c solves Vᵀc = w, i.e. Σ_j c_j D_j = Σ_k w_k a_k for
    the polynomial through the points (module docstring).

    Newton form: the interpolant of the first m points adds f[u_0 … u_{m−1}] N_{m−1} to that of m − 1,
    N_l = Π_{i<l} (u − u_i), so c^{(m)}_j = Σ_{j≤l<m} I(N_l) / Π_{i≤l, i≠j} (u_j − u_i) with I(u^k) = w_k:
    O(K²) operations for all K orders.
    """
    count = u.shape[-1]
    w = phi_weights(big_h, count)
    zero = jnp.zeros_like(big_h)
    newton, integrals = [jnp.ones_like(big_h)], []  # N_l's coefficients, increasing powers
    for l in range(count):
        integrals.append(sum(w[..., k] * newton[k] for k in range(l + 1)))
        newton = [b - u[..., l] * a for a, b in zip(newton + [zero], [zero] + newton)]
    prods, acc, rows = [], [], []
    for l in range(count):
        prods = [p * (u[..., j] - u[..., l]) for j, p in enumerate(prods)]
        prods.append(math.prod([u[..., l] - u[..., i] for i in range(l)], start=jnp.ones_like(big_h)))
        acc = [c + integrals[l] / p for c, p in zip(acc + [zero], prods)]
        rows.append(jnp.stack(acc + [zero] * (count - l - 1), -1))
    return jnp.stack(rows, -2)


def exponential_weights(u: Array, big_h: Array) -> Array:
    """c with Vᵀc = w for all the points u (last axis): the last row of `prefix_weights`."""
    return prefix_weights(u, big_h)[..., -1, :]


def step_order(order: int, i: Array, n: int, lower_order_final: bool) -> Array:
    """The order of step i of n − 1: min(order, i + 1) (warm-up), and, with `lower_order_final` on
    grids of fewer than LOWER_ORDER_FINAL_STEPS steps, at most n − 1 − i (the last step first order)."""
    k = jnp.minimum(order, i + 1)
    if lower_order_final and n - 1 < LOWER_ORDER_FINAL_STEPS:
        k = jnp.minimum(k, n - 1 - i)
    return k


def history_u(lam: Array, size: int) -> tuple[Array, Array]:
    """For each step i: h_i = λ_{i+1} − λ_i and u_ij = (λ_{i−j} − λ_i)/h_i, j < size, shape (n−1, size).

    Points before the grid (i − j < 0) are placeholders at λ_0 − 1, λ_0 − 2, …: finite and distinct
    (λ increases), so the weights of every order are finite and the order is chosen by a mask.
    """
    steps = lam.shape[0] - 1
    lam_ext = jnp.concatenate([lam[0] - jnp.arange(size - 1, 0, -1, dtype=lam.dtype), lam])
    hist = jnp.stack([lam_ext[size - 1 - j: size - 1 - j + steps] for j in range(size)], -1)
    h = lam[1:] - lam[:-1]
    return h, (hist - lam[:-1, None]) / h[:, None]


def select_order(table: Array, k: Array) -> Array:
    """Row k_i − 1 of each step's (K, K) weight table; every row is finite, so a mask selects, never a NaN."""
    return sum(jnp.where((k == m + 1)[:, None], table[:, m], 0.0) for m in range(table.shape[-2]))


def multistep_plan(sde: SDE, ts: Array, order: int, lower_order_final: bool, table_fn: TableFn,
                   eta: float = 0.0) -> tuple[Plan, tuple[Array, Array, Array]]:
    """The `Plan` of a multistep solver on the grid `ts` (weights `table_fn(u, h)` at each step's order),
    and (u, h, k) for a corrector."""
    alpha, sigma = sde.marginal_coeffs(ts)
    h, u = history_u(half_log_snr(sde, ts), order)
    k = step_order(order, jnp.arange(ts.shape[0] - 1), ts.shape[0], lower_order_final)
    decay = sigma[1:] / sigma[:-1] * (jnp.exp(-eta * h) if eta else 1.0)
    noise = sigma[1:] * jnp.sqrt(-jnp.expm1(-2.0 * eta * h)) if eta else jnp.zeros_like(h)
    return Plan(decay, alpha[1:], select_order(table_fn(u, h), k), noise), (u, h, k)


def combine(x: Array, decay: Array, alpha: Array, weights: Array, ds: Array) -> Array:
    """decay·x + alpha·Σ_j weights_j ds[j] (`ds` stacked on axis 0)."""
    return decay * x + alpha * jnp.tensordot(weights, ds, axes=1)


def push(history: Array, value: Array) -> Array:
    """Newest-first history with `value` in front and the oldest entry dropped."""
    return jnp.concatenate([value[None], history[:-1]])


def x0_at(sde: SDE, score_fn: ScoreFn, x: Array, t: Array) -> Array:
    """D = x̂₀(x, t) for a scalar time t."""
    return tweedie_x0(sde, score_fn, x, batch_time(t, x))


def denoised_final(sde: SDE, score_fn: ScoreFn, x: Array, ts: Array, denoise: bool) -> Array:
    """The step to σ = 0 (first order, chosen statically): x̂₀(x, t_{n−1}) with `denoise`, else x."""
    return x0_at(sde, score_fn, x, ts[-1]) if denoise else x


def check_order(order: int, valid: tuple[int, ...]) -> None:
    if isinstance(order, bool) or order not in valid:
        raise ValueError(f"unknown order {order!r}; valid orders: {list(valid)}")


@dataclasses.dataclass(frozen=True)
class DPMSolverPP:
    """Multistep DPM-Solver++(order): 1, 2 (2M) or 3 (3M); `eta` > 0 is SDE-DPM-Solver++ (module docstring).

    Step i evaluates D at (x_i, t_i). `lower_order_final`: see `step_order` (dpm-solver's < 10 steps).
    The noise of step i is z = normal(key_i) in the dtype of x, so SDE-DPM-Solver++(1) with η = 1 is
    DDIM η = 1 with that z. NFE = (n − 1) + [denoise].
    """

    multistep: ClassVar[bool] = True  # its state is a history of past steps (no RePaint resampling)

    order: int = 2
    eta: float = 0.0
    lower_order_final: bool = True

    def __post_init__(self):
        check_order(self.order, (1, 2, 3))
        check_number("eta", self.eta)

    def init(self, sde: SDE, score_fn: ScoreFn, x: Array, ts: Array) -> tuple[Array, Plan]:
        plan, _ = multistep_plan(sde, ts, self.order, self.lower_order_final,
                                 lambda u, h: prefix_weights(u, (1.0 + self.eta) * h), self.eta)
        return jnp.zeros((self.order, *x.shape), x.dtype), plan

    def step(self, sde: SDE, score_fn: ScoreFn, rng: Array, state: Any, x: Array, i: Array,
             ts: Array) -> tuple[Array, Any]:
        ds, plan = state
        ds = push(ds, x0_at(sde, score_fn, x, ts[i]))
        x = combine(x, plan.decay[i], plan.alpha[i], plan.weights[i], ds)
        if self.eta:
            x = x + plan.noise[i] * jax.random.normal(rng, x.shape, x.dtype)
        return x, (ds, plan)

    def final(self, sde: SDE, score_fn: ScoreFn, rng: Array, state: Any, x: Array, ts: Array,
              denoise: bool) -> Array:
        return denoised_final(sde, score_fn, x, ts, denoise)

    def nfe(self, n: int, denoise: bool) -> int:
        return n - 1 + int(denoise)


@dataclasses.dataclass(frozen=True)
class DPMSolverPP2S:
    """Singlestep DPM-Solver++(2S): from s to t through the midpoint λ_m = (λ_s + λ_t)/2 (r = ½).

    x_m = (σ_m/σ_s) x_s + α_m ψ_1(λ_m − λ_s) D_s, then x_t with the line through (λ_s, D_s),
    (λ_m, D(x_m, t_m)); t_m from `sde.t_from_log_snr`, once per grid. NFE = 2(n − 1) + [denoise].
    """

    def init(self, sde: SDE, score_fn: ScoreFn, x: Array, ts: Array) -> tuple[Array, Plan, Plan]:
        lam = half_log_snr(sde, ts)
        t_mid = sde.t_from_log_snr(lam[:-1] + lam[1:]).astype(ts.dtype)  # log-SNR 2λ_m = λ_s + λ_t
        alpha, sigma = sde.marginal_coeffs(ts)
        a_mid, s_mid = sde.marginal_coeffs(t_mid)
        h, h_mid = lam[1:] - lam[:-1], half_log_snr(sde, t_mid) - lam[:-1]
        u = jnp.stack([jnp.zeros_like(h), h_mid / h], -1)
        zero = jnp.zeros_like(h)
        to_mid = Plan(s_mid / sigma[:-1], a_mid, phi_weights(h_mid, 1), zero)
        return t_mid, to_mid, Plan(sigma[1:] / sigma[:-1], alpha[1:], exponential_weights(u, h), zero)

    def step(self, sde: SDE, score_fn: ScoreFn, rng: Array, state: Any, x: Array, i: Array,
             ts: Array) -> tuple[Array, Any]:
        t_mid, to_mid, to_end = state
        d_s = x0_at(sde, score_fn, x, ts[i])[None]
        x_mid = combine(x, to_mid.decay[i], to_mid.alpha[i], to_mid.weights[i], d_s)
        ds = jnp.concatenate([d_s, x0_at(sde, score_fn, x_mid, t_mid[i])[None]])
        return combine(x, to_end.decay[i], to_end.alpha[i], to_end.weights[i], ds), state

    def final(self, sde: SDE, score_fn: ScoreFn, rng: Array, state: Any, x: Array, ts: Array,
              denoise: bool) -> Array:
        return denoised_final(sde, score_fn, x, ts, denoise)

    def nfe(self, n: int, denoise: bool) -> int:
        return 2 * (n - 1) + int(denoise)
