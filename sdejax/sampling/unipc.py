"""UniPC (Zhao et al., 2023): the UniP-p predictor with the UniC corrector, data-prediction form, any linear SDE.

With h = λ_t − λ_s (half-log-SNR), r_m = (λ_m − λ_s)/h for the earlier points and D1_m = (D_m − D_s)/r_m,

    UniP-p:  x_t = (σ_t/σ_s) x_s + α_t ψ_1(h) D_s − α_t B(h) Σ_{m<p} ρ^p_m D1_m,
    UniC-p:  x_t^c = (σ_t/σ_s) x_s + α_t ψ_1(h) D_s − α_t B(h) [Σ_{m<p} ρ^c_m D1_m + ρ^c_p (D_t − D_s)],

where D_t = D(x_t^pred, t) (r = 1) and ρ solves R ρ = b, R_km = r_m^{k−1}, b_k = k! g_{k+1}/B(h),
g_k = −h φ_k(−h) (`dpm_solver.phi_weights`: g_{k+1} k! = −w_k for η = 0). B(h) = −h (bh1) or
e^{−h} − 1 (bh2).

Solved exactly, B(h) cancels: B Σ_m ρ_m D1_m = −Σ_k w_k a_k for the polynomial Σ a_k u^k through
the points, so UniP-p is the exponential Adams–Bashforth of DPM-Solver++(pM) and UniC-p the
Adams–Moulton through the p points and (1, D_t) (orders p and p + 1); `exponential_weights` computes
exactly that. The reference code (UniPC, diffusers) replaces the one-unknown systems — UniP-2 and
UniC-1 — by ρ = ½; the variants 'bh1' and 'bh2' keep that shortcut (the only place B(h) matters; it
changes a step by O(h³), keeping the orders), 'exact' solves every system (the fix argued in
diffusers PR #11612).

The corrector reuses the evaluation D_t as the next step's D_s (at the uncorrected point, as the
reference), so it costs no NFE; it is off on the last step t_{n−2} → t_{n−1}, whose D_t is never
needed (`lax.cond` skips that evaluation). With `denoise`, `final` returns x̂₀ at t_{n−1}, which
is the first-order UniP step to σ = 0. NFE = (n − 1) + [denoise].
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from sdejax.sampling.dpm_solver import (
    Plan, check_order, combine, denoised_final, multistep_plan, phi_weights, prefix_weights, push, select_order,
    x0_at,
)
from sdejax.sde import SDE, ScoreFn

Array = jax.Array

VARIANTS = ("bh1", "bh2", "exact")


def b_of_h(variant: str, h: Array) -> Array:
    """B(h): −h for bh1, e^{−h} − 1 for bh2 (data prediction, hh = −h)."""
    return -h if variant == "bh1" else jnp.expm1(-h)


def unipc_table(variant: str, u: Array, h: Array) -> Array:
    """`prefix_weights` of the points u (last axis, u_0 = 0), with, in 'bh1'/'bh2', the two-point row
    replaced by the ρ = ½ shortcut: α_t ψ_1 D_0 − α_t B ρ (D_1 − D_0)/u_1 has c_1 = −Bρ/u_1, c_0 = ψ_1 − c_1."""
    table = prefix_weights(u, h)
    if variant == "exact" or u.shape[-1] < 2:
        return table
    c1 = -0.5 * b_of_h(variant, h) / u[..., 1]
    return table.at[..., 1, 0].set(phi_weights(h, 1)[..., 0] - c1).at[..., 1, 1].set(c1)


@dataclasses.dataclass(frozen=True)
class UniPC:
    """UniPC of `order` 1, 2 or 3 (UniP-p + UniC-p, order p + 1); `corrector=False` is UniP-p alone (order p).

    The state is the newest-first history of D at the grid points (D_0 evaluated in `init`), the
    predictor's `Plan` and the corrector's weights (the last one for D_t; None without corrector). Warm-up and
    `lower_order_final` as DPM-Solver++ (`dpm_solver.step_order`: fewer than 10 steps).
    """

    multistep: ClassVar[bool] = True  # its state is a history of past steps (no RePaint resampling)

    order: int = 2
    variant: str = "bh2"
    corrector: bool = True
    lower_order_final: bool = True

    def __post_init__(self):
        check_order(self.order, (1, 2, 3))
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; valid variants: {list(VARIANTS)}")

    def init(self, sde: SDE, score_fn: ScoreFn, x: Array, ts: Array) -> tuple[Array, Plan, Array | None]:
        table_fn = functools.partial(unipc_table, self.variant)
        plan, (u, h, k) = multistep_plan(sde, ts, self.order, self.lower_order_final, table_fn)
        # The corrector's points: u_0 = 0, then the step's end u = 1, then the earlier points, so the
        # order-k corrector is the prefix of k + 1; its weights are put back as (history…, D_t).
        corrector = None
        if self.corrector:
            points = jnp.concatenate([u[:, :1], jnp.ones_like(u[:, :1]), u[:, 1:]], -1)
            corrector = select_order(table_fn(points, h), k + 1)[:, [0, *range(2, self.order + 1), 1]]
        ds = jnp.zeros((self.order, *x.shape), x.dtype)
        if ts.shape[0] > 1:  # with no step D_0 is never used
            ds = push(ds, x0_at(sde, score_fn, x, ts[0]))
        return ds, plan, corrector

    def step(self, sde: SDE, score_fn: ScoreFn, rng: Array, state: Any, x: Array, i: Array,
             ts: Array) -> tuple[Array, Any]:
        ds, plan, corrector = state
        x_pred = combine(x, plan.decay[i], plan.alpha[i], plan.weights[i], ds)

        def evaluate(_):
            d_t = x0_at(sde, score_fn, x_pred, ts[i + 1])
            x_next = x_pred
            if self.corrector:
                x_next = combine(x, plan.decay[i], plan.alpha[i], corrector[i], jnp.concatenate([ds, d_t[None]]))
            return x_next, (push(ds, d_t), plan, corrector)

        return jax.lax.cond(i == ts.shape[0] - 2, lambda _: (x_pred, state), evaluate, None)

    def final(self, sde: SDE, score_fn: ScoreFn, rng: Array, state: Any, x: Array, ts: Array,
              denoise: bool) -> Array:
        return denoised_final(sde, score_fn, x, ts, denoise)

    def nfe(self, n: int, denoise: bool) -> int:
        return n - 1 + int(denoise)
