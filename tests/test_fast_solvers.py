"""EDM Heun, DPM-Solver++ and UniPC (`sdejax.sampling.{heun,dpm_solver,unipc}`) against oracles that need no training.

- Gaussian data N(μ, diag S): score −(x − α_t μ)/C_t with C_t = α_t² S + σ_t², and the probability-flow
  map x_s = α_s μ + sqrt(C_s/C_t)(x_t − α_t μ) in closed form; deterministic solvers converge to it at
  their order (float64).
- Point mass (S = 0): D ≡ μ, which every solver here integrates exactly at every step.
- Identities between methods, to rounding; UniPC's R ρ = b against the closed-form weights.
- The 0.2/0.8 two-mode mixture with its exact score: the weight of the small mode.
Every run counts score evaluations (`tests/counting.py`) and checks the solver's NFE formula.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from counting import CountingScore
from sdejax.analytic import GaussianMixture
from sdejax.sampling import grids
from sdejax.sampling.ddim import ddim_step
from sdejax.sampling.dpm_solver import DPMSolverPP, DPMSolverPP2S, exponential_weights, phi_weights, prefix_weights
from sdejax.sampling.heun import HeunSolver, sigma_tilde
from sdejax.sampling.loop import sample_loop
from sdejax.sampling.unipc import UniPC, b_of_h, unipc_table
from sdejax.score import tweedie_x0
from sdejax.sde import EDMSDE, CosineVPSDE, VESDE, VPSDE, subVPSDE

EPS64 = np.finfo(np.float64).eps
SDES = [VESDE(), VPSDE(), subVPSDE(), CosineVPSDE(), EDMSDE()]
IDS = [type(s).__name__ for s in SDES]
KEY = jax.random.PRNGKey(0)


class DiagGaussian(NamedTuple):
    """N(mean, diag(var)) data (var = 0: a point mass), with the interface CountingScore expects."""

    mean: np.ndarray
    var: np.ndarray

    def _c(self, alpha, sigma):
        return alpha**2 * self.var + sigma**2

    def score_fn(self, sde):
        def score(x, t):
            alpha, sigma = (v[:, None] for v in sde.marginal_coeffs(t))
            return -(x - alpha * self.mean) / self._c(alpha, sigma)

        return score

    def flow(self, sde, x, t, s):
        """The probability-flow map from time t to s (scalars or arrays broadcasting against x's batch axis)."""
        a_t, s_t = sde.marginal_coeffs(jnp.asarray(t, x.dtype))
        a_s, s_s = sde.marginal_coeffs(jnp.asarray(s, x.dtype))
        return a_s * self.mean + jnp.sqrt(self._c(a_s, s_s) / self._c(a_t, s_t)) * (x - a_t * self.mean)


MU, VAR = np.array([1.0, -0.5, 2.0]), np.array([0.25, 1.0, 4.0])
ORACLES = {"gauss": DiagGaussian(MU, VAR), "point": DiagGaussian(MU, np.zeros(3))}
MIXTURE = GaussianMixture.create([0.2, 0.8], [[-5.0, -5.0], [5.0, 5.0]])


def run_many(cases, sde, oracle, x, denoise=False, trajectory=False, rng=KEY):
    """`sample_loop(solver, …, ts)` for every (solver, ts) in `cases`, compiled as one program (compiling
    is what costs here), each with its own CountingScore: checks every run's NFE against its count."""
    data = MIXTURE if oracle == "mixture" else ORACLES[oracle]
    scores = [CountingScore(data, sde) for _ in cases]

    def body(x, grids_):
        return [sample_loop(solver, sde, score, rng, x, ts, denoise=denoise, trajectory=trajectory)[:-1]
                for (solver, _), score, ts in zip(cases, scores, grids_)]

    outs = jax.block_until_ready(jax.jit(body)(x, [jnp.asarray(ts, x.dtype) for _, ts in cases]))
    jax.effects_barrier()
    for (solver, ts), score in zip(cases, scores):
        assert score.calls == solver.nfe(len(ts), denoise), (solver, len(ts), denoise, score.calls)
    return [out if trajectory else out[0] for out in outs]


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def prior(sde, shape, dtype=jnp.float64):
    return sde.prior_sampling(jax.random.PRNGKey(1), shape, dtype)


# --- convergence order on the Gaussian oracle ------------------------------------------------------
# The global error of an order-p method is C n^{−p}(1 + O(1/n)), so the slope fitted over n = 32, 64,
# 128 drifts from p by O(1/n); a wrong coefficient in the k-th term drops the order to an integer
# ≤ p − 1. ±0.25 separates the two (measured drift here: ≤ 0.16). The grid is Karras (ρ = 7): on the
# λ-uniform grid this oracle is degenerate for 3M — its leading error integrates to a boundary term
# (∫ g‴g dλ = [g″g − g′²/2] ≈ 0 for the per-feature profile g of D along the flow), so the O(h²) term of
# its first-order warm-up step, of the opposite sign, surfaces near n ≈ 100 and no range shows the order.
ORDER_NS = (32, 64, 128)
ORDER_SOLVERS = [
    ("euler", HeunSolver(second_order=False), 1), ("heun", HeunSolver(), 2),
    ("dpm++2M", DPMSolverPP(2), 2), ("dpm++3M", DPMSolverPP(3), 3), ("dpm++2S", DPMSolverPP2S(), 2),
    ("unipc1", UniPC(1), 2), ("unipc2", UniPC(2), 3), ("unipc3", UniPC(3), 4),
    ("unip2", UniPC(2, corrector=False), 2),
]
VARIANT_SOLVERS = [("unipc1-bh1", UniPC(1, variant="bh1"), 2), ("unipc2-exact", UniPC(2, variant="exact"), 3)]


def fitted_orders(solvers, sde) -> dict[str, float]:
    """−slope of log max|x_n − x*| against log n per solver, from t = T to eps on the Karras grid, float64."""
    oracle, x = ORACLES["gauss"], prior(sde, (4, 3))
    grids_ = [grids.karras(sde, n) for n in ORDER_NS]
    outs = run_many([(solver, ts) for _, solver, _ in solvers for ts in grids_], sde, "gauss", x)
    exact = [oracle.flow(sde, x, ts[0], ts[-1]) for ts in grids_]
    slopes = {}
    for k, (name, _, _) in enumerate(solvers):
        errors = [float(jnp.max(jnp.abs(out - ref))) for out, ref in zip(outs[3 * k: 3 * k + 3], exact)]
        assert min(errors) > 1e6 * EPS64, (name, errors)  # far above rounding
        slopes[name] = -np.polyfit(np.log(ORDER_NS), np.log(errors), 1)[0]
    assert all(out.dtype == jnp.float64 for out in outs)
    return slopes


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_order_of_convergence(x64, sde):
    slopes = fitted_orders(ORDER_SOLVERS, sde)
    print(f"\n{type(sde).__name__} fitted orders: " + ", ".join(f"{name} {v:.2f}" for name, v in slopes.items()))
    assert all(abs(slopes[name] - order) <= 0.25 for name, _, order in ORDER_SOLVERS), slopes


def test_order_of_unipc_variants(x64):
    slopes = fitted_orders(VARIANT_SOLVERS, VPSDE())
    assert all(abs(slopes[name] - order) <= 0.25 for name, _, order in VARIANT_SOLVERS), slopes


# --- point mass: exact at every step -----------------------------------------------------------------
# D ≡ μ, so x_t − α_t μ = (σ_t/σ_s)(x_s − α_s μ) exactly: the exponential integrators are exact for a
# constant D and Euler/Heun for x̃ − μ linear in σ̃. Each step rounds a few times; tolerance 64 ε per step
# of the largest |x|. n = 10 (9 steps) also runs the `lower_order_final` branch; with `trajectory` the
# same run checks one step (xs[0]) and many, and `denoise` must return μ (also for the stochastic ones).
DETERMINISTIC = [
    HeunSolver(second_order=False), HeunSolver(), DPMSolverPP(1), DPMSolverPP(2), DPMSolverPP(3),
    DPMSolverPP2S(), UniPC(1), UniPC(2), UniPC(3), UniPC(3, corrector=False), UniPC(2, variant="bh1"),
    UniPC(2, variant="exact"),
]
STOCHASTIC = [HeunSolver(s_churn=20.0, s_tmin=0.05, s_tmax=10.0, s_noise=1.003), DPMSolverPP(2, eta=1.0),
              DPMSolverPP(3, eta=0.5)]


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_point_mass_is_exact(x64, sde):
    oracle, x = ORACLES["point"], prior(sde, (3, 3))
    ts = grids.log_snr(sde, 10)
    outs = run_many([(solver, ts) for solver in DETERMINISTIC + STOCHASTIC], sde, "point", x, True, True)
    tol = 64 * len(ts) * EPS64 * max(1.0, float(jnp.max(jnp.abs(x))))
    exact = jax.vmap(lambda t: oracle.flow(sde, x, ts[0], t))(jnp.asarray(ts[1:]))
    for solver, (out, xs) in zip(DETERMINISTIC + STOCHASTIC, outs):
        np.testing.assert_allclose(out, np.broadcast_to(MU, out.shape), rtol=0, atol=64 * EPS64 * 4,
                                   err_msg=repr(solver))
        if solver in DETERMINISTIC:
            np.testing.assert_allclose(xs, exact, rtol=0, atol=tol, err_msg=repr(solver))


def test_grid_without_steps(x64):
    """n = 1: no step, `final` alone: x̂₀(x_T) = μ with denoise (NFE 1), x_T without (NFE 0)."""
    sde, solvers = VPSDE(), [UniPC(3), DPMSolverPP(3), HeunSolver(), DPMSolverPP2S()]
    x, ts = prior(sde, (2, 3)), np.array([VPSDE().T])
    alpha_T, _ = sde.marginal_coeffs(jnp.asarray(sde.T))
    tol = 64 * EPS64 * float(jnp.max(jnp.abs(x))) / float(alpha_T)  # x̂₀ = (x + σ² s)/α rounds at |x|/α
    for out in run_many([(s, ts) for s in solvers], sde, "point", x, denoise=True):
        np.testing.assert_allclose(out, np.broadcast_to(MU, x.shape), rtol=0, atol=tol)
    for out in run_many([(s, ts) for s in solvers], sde, "point", x, denoise=False):
        np.testing.assert_array_equal(out, x)


# --- identities between methods, to rounding ------------------------------------------------------------
# Different arrangements of the same map: each step rounds a few times, so 64 ε per step of the largest |x|.
def ddim_reference(sde, x, ts, eta, rng=KEY):
    """DDIM on the grid with `ddim_step`, its noise drawn as the loop draws it: normal(fold_in(rng, i))."""
    score = ORACLES["gauss"].score_fn(sde)
    for i in range(len(ts) - 1):
        t, s = (jnp.full(x.shape[:1], v, x.dtype) for v in (ts[i], ts[i + 1]))
        z = jax.random.normal(jax.random.fold_in(rng, i), x.shape, x.dtype)
        x = ddim_step(sde, x, tweedie_x0(sde, score, x, t), t, s, eta, z)
    return x


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_ddim_is_dpm_solver_1_is_euler_and_unip_is_multistep(x64, sde):
    """DDIM(η = 0) ≡ DPM-Solver++(1) ≡ Euler in σ̃; SDE-DPM-Solver++(1) ≡ DDIM(η = 1) with the same z;
    UniP-p with every R ρ = b solved ≡ DPM-Solver++(pM) (the exponential Adams–Bashforth)."""
    x, ts = prior(sde, (4, 3)), grids.karras(sde, 12)
    tol = 64 * len(ts) * EPS64 * float(jnp.max(jnp.abs(x)))
    solvers = [DPMSolverPP(1), HeunSolver(second_order=False), DPMSolverPP(1, eta=1.0),
               UniPC(2, variant="exact", corrector=False), DPMSolverPP(2),
               UniPC(3, variant="exact", corrector=False), DPMSolverPP(3)]
    pp1, euler, sde1, unip2, pp2, unip3, pp3 = run_many([(s, ts) for s in solvers], sde, "gauss", x)
    ddim, ddim1 = ddim_reference(sde, x, ts, 0.0), ddim_reference(sde, x, ts, 1.0)
    for got, want in [(pp1, ddim), (euler, ddim), (sde1, ddim1), (unip2, pp2), (unip3, pp3)]:
        np.testing.assert_allclose(got, want, rtol=0, atol=tol)
    assert float(jnp.max(jnp.abs(ddim1 - ddim))) > 1e3 * tol  # the noise is there


@pytest.mark.parametrize("variant", ["bh1", "bh2"])
def test_unipc_weights_solve_the_paper_system(x64, variant):
    """Against UniPC's own definition in numpy: R_km = r_m^{k−1}, b_k = k! g_{k+1}/B(h), g_k = −h φ_k(−h),
    and x_t = … + α_t ψ_1 D_0 − α_t B Σ_m ρ_m (D_m − D_0)/r_m. B cancels; ρ = ½ for one unknown."""
    h = 0.37
    g = [np.expm1(-h)]  # g_1 = e^{−h} − 1, g_{k+1} = g_k/(−h) − 1/k!
    for k in range(1, 5):
        g.append(g[-1] / -h - 1 / math.factorial(k))
    big_b = float(b_of_h(variant, jnp.asarray(h)))
    for r in ([-0.8, 1.0], [-0.8, -1.9], [-0.8, -1.9, 1.0], [-0.6, -1.3, -2.2, 1.0]):
        r = np.array(r)
        rho = np.linalg.solve(np.vander(r, len(r), increasing=True).T,
                              [math.factorial(k) * g[k] / big_b for k in range(1, len(r) + 1)])
        c_rest = -big_b * rho / r
        expected = np.concatenate([[-g[0] - c_rest.sum()], c_rest])
        u = jnp.asarray(np.concatenate([[0.0], r]))
        np.testing.assert_allclose(unipc_table("exact", u, jnp.asarray(h))[-1], expected, rtol=1e-12)
    c1 = -0.5 * big_b  # the one-unknown shortcut (UniC-1), u = (0, 1)
    np.testing.assert_allclose(unipc_table(variant, jnp.array([0.0, 1.0]), jnp.asarray(h))[-1],
                               [-g[0] - c1, c1], rtol=1e-14)


def test_exponential_weights_integrate_polynomials_exactly(x64):
    """Every prefix of the points: Σ_j c_j u_j^k = ∫_0^1 e^{−H(1−θ)} θ^k H dθ for k < m (quadrature in numpy)."""
    h = 0.9
    u = jnp.array([0.0, -0.5, -1.3, 1.0])
    theta = np.linspace(0.0, 1.0, 200_001)
    table = prefix_weights(u, jnp.asarray(h))  # row m − 1: the weights of the first m points alone
    for m in range(1, 5):
        for k in range(m):
            integral = np.trapezoid(np.exp(-h * (1 - theta)) * theta**k * h, theta)
            np.testing.assert_allclose(float(jnp.dot(table[m - 1], u**k)), integral, rtol=1e-9)
        np.testing.assert_array_equal(table[m - 1, m:], 0.0)
    np.testing.assert_allclose(exponential_weights(u, jnp.asarray(h)), table[-1], rtol=0)
    np.testing.assert_allclose(phi_weights(jnp.asarray(h), 1)[0], -np.expm1(-h), rtol=1e-15)


# --- the two-mode mixture: the weight of the small mode ------------------------------------------------
# x_T is drawn from the exact marginal p_T (α_T x₀ + σ_T z), so a prior mismatch (VE: mean 3 against
# σ_max = 50 moves the weight by ~0.02) is not charged to the solver; the flow maps p_T to p_eps, whose
# small mode (x₁ + x₂ < 0) weighs 0.2 up to e^{−50}. The estimate has Monte-Carlo SE sqrt(0.2·0.8/N).
# Discretisation bias, Richardson-style: with the same x_T, m_N − m_∞ ≈ (m_N − m_2N)/(1 − 2^{−p}), at
# most 2|m_N − m_2N| for order p ≥ 1. Pass: |m_N − 0.2| ≤ 3 SE + 2|m_N − m_2N|, and the allowance itself
# below 0.05 (a quarter of the weight: a solver that far from converged does not recover it).
MIX_N = 4000
MIX_SDES = [(VESDE(), False), (VPSDE(), True), (EDMSDE(), False)]  # (schedule, with the stochastic samplers)


def small_mode_weight(x):
    return float(jnp.mean(x[:, 0] + x[:, 1] < 0))


@pytest.mark.parametrize("sde,stochastic", MIX_SDES, ids=[type(s).__name__ for s, _ in MIX_SDES])
def test_mixture_mode_weight(sde, stochastic):
    k_data, k_noise = jax.random.split(jax.random.PRNGKey(2))
    alpha_T, sigma_T = sde.marginal_coeffs(jnp.asarray(sde.T))
    x_T = alpha_T * MIXTURE.sample(k_data, MIX_N) + sigma_T * jax.random.normal(k_noise, (MIX_N, 2))
    runs = {"heun": (HeunSolver(), grids.karras, (18, 36)),  # 35 NFE
            "dpm++3M": (DPMSolverPP(3), grids.log_snr, (10, 20, 40)), "unipc": (UniPC(3), grids.log_snr, (10, 20, 40))}
    if stochastic:
        runs |= {"heun-churn": (HeunSolver(s_churn=10.0, s_tmin=0.05, s_tmax=10.0), grids.karras, (18, 36)),
                 "sde-dpm++2M": (DPMSolverPP(2, eta=1.0), grids.log_snr, (20, 40))}
    cases = [(solver, grid(sde, n)) for solver, grid, ns in runs.values() for n in ns]
    outs = run_many(cases, sde, "mixture", x_T, denoise=True)
    assert all(out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out))) for out in outs)
    outs = iter(outs)
    se = math.sqrt(0.2 * 0.8 / MIX_N)
    for name, (_, _, ns) in runs.items():
        weights = [small_mode_weight(next(outs)) for _ in ns]
        for n, (m_n, m_2n) in zip(ns, zip(weights, weights[1:])):
            allowance = 2 * abs(m_n - m_2n)
            print(f"{type(sde).__name__} {name} NFE {n + (n - 1) * (name.startswith('heun'))}: "
                  f"weight {m_n:.4f} (2N: {m_2n:.4f}), bound {3 * se + allowance:.4f}")
            assert allowance <= 0.05 and abs(m_n - 0.2) <= 3 * se + allowance, (name, n, weights)


# --- options, churn, gradients ------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [
    lambda: DPMSolverPP(order=4), lambda: DPMSolverPP(order=True), lambda: DPMSolverPP(eta=-0.1),
    lambda: DPMSolverPP(eta=float("nan")), lambda: UniPC(order=0), lambda: UniPC(variant="bh3"),
    lambda: HeunSolver(s_churn=-1.0), lambda: HeunSolver(s_noise=-1.0), lambda: HeunSolver(s_tmin=-0.1),
    lambda: HeunSolver(s_tmin=2.0, s_tmax=1.0),
])
def test_bad_options_raise(make):
    with pytest.raises(ValueError):
        make()


def test_churn_plan(x64):
    """γ_i = min(S_churn/n, √2 − 1) where S_tmin ≤ σ̃_i ≤ S_tmax, σ̂ = σ̃(1 + γ) clamped to σ̃(T), σ̃(t̂) = σ̂."""
    sde, n = VPSDE(), 12
    ts = jnp.asarray(grids.karras(sde, n))
    solver = HeunSolver(s_churn=2.0, s_tmin=0.5, s_tmax=100.0, s_noise=1.5)
    plan = jax.jit(lambda ts: solver.init(sde, None, jnp.zeros((1, 3)), ts))(ts)
    sig, sig_max = np.asarray(sigma_tilde(sde, ts)), float(sigma_tilde(sde, jnp.asarray(sde.T)))
    gamma = np.where((sig >= 0.5) & (sig <= 100.0), min(2.0 / n, math.sqrt(2) - 1), 0.0)
    want = np.minimum(sig * (1 + gamma), sig_max)
    assert sig[0] > 100.0 and (gamma[1:] > 0).any() and (gamma == 0).any()  # the grid exercises every case
    np.testing.assert_allclose(plan.sigma_hat, want, rtol=1e-14)
    np.testing.assert_allclose(sigma_tilde(sde, plan.t_hat), want, rtol=1e-10)  # t(λ) round trip
    assert float(jnp.max(plan.t_hat)) <= sde.T
    np.testing.assert_allclose(plan.noise, 1.5 * np.sqrt(want**2 - sig**2), rtol=1e-12, atol=1e-12)
    clamped = jax.jit(lambda ts: HeunSolver(s_churn=40.0).init(sde, None, jnp.zeros((1, 3)), ts))(ts)  # γ = √2 − 1
    np.testing.assert_allclose(clamped.sigma_hat[0], sig_max, rtol=1e-14)  # σ̂_0 would exceed σ̃(T)
    np.testing.assert_allclose(clamped.sigma_hat[1:], sig[1:] * math.sqrt(2), rtol=1e-14)


def test_gradients_are_finite(x64):
    """d(samples)/d(x_T, ts) through the step to σ = 0, every warm-up order (placeholder points, masked
    selects) and churn on some steps only: no NaN from an unused branch or a sqrt at 0."""
    sde = VPSDE()
    x, ts = prior(sde, (2, 3)), jnp.asarray(grids.log_snr(sde, 6))
    score = ORACLES["gauss"].score_fn(sde)
    solvers = [DPMSolverPP(3), DPMSolverPP(3, eta=1.0), UniPC(3), HeunSolver(s_churn=1.0, s_tmin=0.5),
               DPMSolverPP2S()]
    grads = jax.jit(lambda x, ts: [jax.grad(lambda y, u: jnp.sum(sample_loop(s, sde, score, KEY, y, u)[0]),
                                            argnums=(0, 1))(x, ts) for s in solvers])(x, ts)
    for solver, grad in zip(solvers, grads):
        assert all(bool(jnp.all(jnp.isfinite(g))) and float(jnp.max(jnp.abs(g))) > 0 for g in grad), solver


@pytest.mark.parametrize("make", [lambda lof: DPMSolverPP(3, lower_order_final=lof),
                                  lambda lof: UniPC(3, lower_order_final=lof)])
def test_warm_up_and_lower_order_final(x64, make):
    """Step orders min(order, i + 1), and with `lower_order_final` on fewer than 10 steps (dpm-solver's
    threshold) at most n − 1 − i: read off the number of nonzero weights of each step."""
    sde = VPSDE()
    for n, lof, orders in [(6, True, [1, 2, 3, 2, 1]), (6, False, [1, 2, 3, 3, 3]), (11, True, [1, 2] + [3] * 8)]:
        init = jax.jit(lambda ts: make(lof).init(sde, ORACLES["point"].score_fn(sde), jnp.zeros((1, 3)), ts))
        plan = init(jnp.asarray(grids.log_snr(sde, n)))[1]
        assert np.count_nonzero(np.asarray(plan.weights), axis=1).tolist() == orders, (n, lof)
