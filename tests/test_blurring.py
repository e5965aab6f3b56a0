"""Blurring diffusion (`sdejax.blurring`) against closed forms, in float64.

Oracles:
- The DCT is orthonormal (CCᵀ = I) and equals scipy's `dctn(norm="ortho")`.
- Blur: the frequency scaling at σ_B is a Gaussian blur of std σ_B with reflecting boundaries
  (independent numpy convolution with the sampled kernel; its DTFT is the heat multiplier e^{−ω²σ_B²/2}
  up to aliasing e^{−(2π − ω_max)²σ_B²/2} < 1e-10 at σ_B = 2); a cosine image's mean scales by
  a(t) d_k(t); frequency 0 keeps the base schedule's α; f_k, g_k match the marginals.
- Gaussian data N(m, diag S) in frequency space (correlated in pixels): per-frequency marginals
  N(α_k m_k, α_k² S_k + σ²), so the score, the density and the PF-ODE flow map
  u_s − α_s m = sqrt(C_s/C_t)(u_t − α_t m) are exact. The PF-ODE likelihood equals the pixel-space
  log-density (scipy, full covariance: the basis change has Jacobian 1); ode_sample equals the flow
  map; DDIM and Heun converge to it at orders 1 and 2; Euler–Maruyama and DDIM η = 1 reproduce the
  mean and covariance (`gaussian_oracle.assert_moments`: Richardson over N and 2N steps, 4 SE).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.fft
from jax.tree_util import Partial
from scipy import stats

from gaussian_oracle import assert_moments
from sdejax.blurring import BlurringSDE, CosineLogSNRSDE, FrequencyNetwork, dct_matrix
from sdejax.likelihood import log_likelihood
from sdejax.sampling import DPMSolverPP, HeunSolver, UniPC, grids, sample_loop
from sdejax.sampling.ddim import ddim_sample
from sdejax.sampling.methods import sample, solve
from sdejax.sampling.ode import ode_sample
from sdejax.sampling.loop import renoise
from sdejax.sampling.pc import EulerMaruyama, Langevin, pc_sample
from sdejax.sampling.sde import sde_sample
from sdejax.score import get_score_fn
from sdejax.sde import SDE

SHAPE = (4, 3, 1)
D = 12
SDE_ = BlurringSDE(SHAPE, sigma_blur_max=2.0)
EPS = 1e-3
_K = np.kron(dct_matrix(SHAPE[0]), dct_matrix(SHAPE[1]))  # u_flat = K x_flat (one channel)
_LAM = SDE_.frequencies[..., 0]
M = (_K @ (0.5 + 0.4 * np.cos(np.pi * np.arange(4)[:, None] / 4) * np.sin(np.arange(3)[None, :] + 1.0)).ravel())
S = 0.05 + 1.0 / (1.0 + 2.0 * _LAM.ravel())  # frequency variances in [0.1, 1.05]


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


def _score(sde, m, s, u, t):
    alpha, sigma = sde.marginal_coeffs(t)
    return -(u - alpha * m) / (alpha**2 * s + sigma**2)


def exact_score(sde: BlurringSDE = SDE_) -> Partial:
    """∇ log p_t(u) = −(u − α m)/(α² S + σ²), elementwise per frequency."""
    return Partial(_score, sde, *(jnp.asarray(v.reshape(SHAPE)) for v in (M, S)))


def coeffs(t: float) -> tuple[np.ndarray, np.ndarray]:
    """Flat (α_t, C_t = α_t² S + σ_t²) per frequency."""
    alpha, sigma = (np.asarray(v[0]).ravel() for v in SDE_.marginal_coeffs(jnp.array([t])))
    return alpha, alpha**2 * S + sigma**2


def flow_map(z: np.ndarray, t: float, s: float) -> np.ndarray:
    """The exact PF-ODE map u_t ↦ u_s of the Gaussian data (module docstring), rows of flat u."""
    (a_t, c_t), (a_s, c_s) = coeffs(t), coeffs(s)
    return a_s * M + np.sqrt(c_s / c_t) * (z - a_t * M)


def flat(u) -> np.ndarray:
    return np.asarray(u).reshape(u.shape[0], -1)


def test_dct_is_orthonormal_and_matches_scipy():
    for n in (1, 3, 4, 8):
        c = dct_matrix(n)
        np.testing.assert_allclose(c @ c.T, np.eye(n), atol=1e-14)
        np.testing.assert_allclose(c.T @ c, np.eye(n), atol=1e-14)
    sde = BlurringSDE((8, 6, 2))
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 8, 6, 2))
    u = sde.from_pixels(x)
    np.testing.assert_allclose(u, scipy.fft.dctn(np.asarray(x), axes=(1, 2), norm="ortho"), atol=1e-13)
    np.testing.assert_allclose(sde.to_pixels(u), x, atol=1e-13)
    np.testing.assert_allclose(jnp.sum(u**2), jnp.sum(x**2), rtol=1e-13)  # Parseval
    with pytest.raises(ValueError, match="shape"):
        BlurringSDE((4, 4))
    with pytest.raises(ValueError, match="min_scale"):
        BlurringSDE((4, 4, 1), min_scale=1.5)


def _reflect_blur(x: np.ndarray, std: float, axis: int) -> np.ndarray:
    """Σ_m G(m) x[n + m] along `axis`, G the sampled N(0, std²) density, x extended half-sample
    symmetrically (… x1 x0 | x0 x1 … x_{n−1} | x_{n−1} …, period 2n: the DCT-II's extension)."""
    n, radius = x.shape[axis], int(np.ceil(10 * std))
    offsets = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 * (offsets / std) ** 2) / np.sqrt(2 * np.pi * std**2)
    r = (np.arange(n)[:, None] + offsets[None, :]) % (2 * n)
    idx = np.where(r < n, r, 2 * n - 1 - r)  # (n, taps)
    return np.moveaxis(np.sum(np.moveaxis(x, axis, -1)[..., idx] * weights, axis=-1), -1, axis)


def test_frequency_scaling_is_gaussian_blur_and_heat_dissipation():
    """At t = T, d_min = 0: d_k = e^{−λ_k σ_B,max²/2} is the Gaussian blur of std σ_B,max (module docstring).
    At any t the mean of x_t | x_0 for the cosine image of frequency k is a(t) d_k(t) times it."""
    h, w, std = 8, 6, 2.0
    sde = BlurringSDE((h, w, 2), sigma_blur_max=std, min_scale=0.0)
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (2, h, w, 2)))
    blurred = sde.to_pixels(jnp.exp(sde.log_scaling(jnp.array(sde.T))) * sde.from_pixels(jnp.asarray(x)))
    np.testing.assert_allclose(blurred, _reflect_blur(_reflect_blur(x, std, 1), std, 2), atol=1e-10)

    sde = BlurringSDE((h, w, 1), sigma_blur_max=3.0)  # the paper's d_min = 0.001 and base schedule
    t = jnp.array([0.0, 0.35, 0.8, 1.0])
    tau = (3.0 * np.sin(np.pi * np.asarray(t) / 2) ** 2) ** 2 / 2
    a, sigma = CosineLogSNRSDE().marginal_coeffs(t)
    for kh, kw in [(0, 0), (1, 0), (0, 2), (3, 5), (7, 5)]:
        image = np.outer(np.cos(np.pi * kh * (np.arange(h) + 0.5) / h), np.cos(np.pi * kw * (np.arange(w) + 0.5) / w))
        image = jnp.asarray(np.broadcast_to(image[None, :, :, None], (4, h, w, 1)))
        mean, std_t = sde.marginal_prob(sde.from_pixels(image), t)
        lam = np.pi**2 * (kh**2 / h**2 + kw**2 / w**2)
        d = 0.999 * np.exp(-lam * tau) + 0.001
        np.testing.assert_allclose(sde.to_pixels(mean), (np.asarray(a) * d)[:, None, None, None] * image, atol=1e-14)
        np.testing.assert_allclose(std_t, np.broadcast_to(np.asarray(sigma)[:, None, None, None], std_t.shape))
    alpha, _ = sde.marginal_coeffs(t)
    np.testing.assert_array_equal(alpha[:, 0, 0, 0], a)  # frequency 0 is never blurred
    # Closed-form f_k, g_k = the generic ones from the marginals (f = d log α/dt, g² = dσ²/dt − 2σ² f).
    for got, generic in zip(sde.coefficients(t[1:]), SDE.coefficients(sde, t[1:])):
        np.testing.assert_allclose(got, generic, rtol=1e-10)


def test_likelihood_equals_pixel_log_density():
    """PF-ODE log p_eps(u) (exact divergence, prior swapped for the true p_T) vs the closed-form pixel-space
    log N(x; Kᵀ α m, Kᵀ diag(C) K) at x = Kᵀu. rtol = atol = 1e-8 bounds each step's local error per
    example RMS; the measured error is ~1e-9 nats/dim, asked: 1e-7 nats/dim (10 × tol)."""
    z = jax.random.normal(jax.random.PRNGKey(2), (8, D))
    a_e, c_e = coeffs(EPS)
    u = a_e * M + np.sqrt(c_e) * np.asarray(z)
    logp, z_t, _ = log_likelihood(jax.random.PRNGKey(0), SDE_, exact_score(), jnp.asarray(u.reshape(8, *SHAPE)),
                                  divergence="exact", rtol=1e-8, atol=1e-8, eps=EPS)
    a_t, c_t = coeffs(SDE_.T)
    z_t = flat(z_t)
    true_prior = np.sum(stats.norm.logpdf(z_t, a_t * M, np.sqrt(c_t)), axis=1)
    corrected = np.asarray(logp) - np.asarray(SDE_.prior_logp(jnp.asarray(z_t))) + true_prior
    pixels = u @ _K  # x = Kᵀ u, rows
    true = stats.multivariate_normal(_K.T @ (a_e * M), _K.T @ np.diag(c_e) @ _K).logpdf(pixels)
    err = np.abs(corrected - true) / D
    print(f"likelihood: max |error| {err.max():.2e} nats/dim")
    assert np.all(err < 1e-7)


def test_ode_matches_flow_map_and_solvers_converge():
    """ode_sample (rtol = atol = 1e-9) ≡ the closed-form flow map T → eps (measured 5e-10, asked 1e-6); on
    uniform grids DDIM (η = 0) and Heun converge to it at orders log2(e_n/e_2n) ≈ 1 (n = 32: 1.00) and
    ≈ 2 (n = 128: 2.17; the stiff blur phase keeps Heun pre-asymptotic below n ≈ 100). Asked: [0.9, 1.1]
    and [1.8, 2.4]."""
    z = jax.random.normal(jax.random.PRNGKey(3), (16, *SHAPE))
    exact = flow_map(flat(z), SDE_.T, EPS)
    x, _ = ode_sample(None, SDE_, exact_score(), z.shape, rtol=1e-9, atol=1e-9, eps=EPS, z=z)
    ode_err = np.abs(flat(x) - exact).max()
    assert ode_err < 1e-6
    ddim = lambda ts: ddim_sample(jax.random.PRNGKey(0), SDE_, exact_score(), z.shape, ts=ts, x_T=z,  # noqa: E731
                                  denoise=False)[0]
    heun = lambda ts: solve(HeunSolver(), jax.random.PRNGKey(0), SDE_, exact_score(), z.shape, ts=ts,  # noqa: E731
                            x_T=z, denoise=False)[0]
    orders = {}
    for name, run, n in (("ddim", ddim, 32), ("heun", heun, 128)):
        e_n, e_2n = (np.abs(flat(run(grids.uniform(SDE_, m, EPS))) - exact).max() for m in (n, 2 * n))
        orders[name] = np.log2(e_n / e_2n)
        print(f"{name}: max error {e_n:.3g} (n = {n}), {e_2n:.3g} (n = {2 * n}), order {orders[name]:.2f}")
    print(f"ode_sample: max error {ode_err:.2e}")
    assert 0.9 < orders["ddim"] < 1.1 and 1.8 < orders["heun"] < 2.4


def _prior_mismatch() -> tuple[np.ndarray, np.ndarray]:
    """|mean| and |cov| error of the exact reverse process from N(0, I) instead of p_T (per frequency:
    K = α_T S / C_T, errors K α_T m and K² (1 − C_T)); diagonal."""
    a_t, c_t = coeffs(SDE_.T)
    k = a_t * S / c_t
    return np.abs(k * a_t * M), np.diag(np.abs(k**2 * (1.0 - c_t)))


def _run_sampler(sampler: str, x_t, ts):
    rng, score = jax.random.PRNGKey(5), exact_score()
    if sampler == "pc_euler_maruyama":
        return pc_sample(rng, SDE_, score, x_t.shape, "euler_maruyama", "none", ts=ts, x_T=x_t, denoise=False)[0]
    if sampler == "ddim_eta1":
        return ddim_sample(rng, SDE_, score, x_t.shape, eta=1.0, ts=ts, x_T=x_t, denoise=False)[0]
    # diffrax Euler–Maruyama in s = T − t on the same equal steps (g enters as a DiagonalLinearOperator)
    return sde_sample(rng, SDE_, score, x_t.shape, num_steps=ts.size - 1, eps=EPS, x_T=x_t)[0]


@pytest.mark.parametrize("sampler", ["pc_euler_maruyama", "sde_sample", "ddim_eta1"])
def test_stochastic_samplers_reproduce_moments(sampler):
    """Reverse-SDE Euler–Maruyama (pc_sample and diffrax's sde_sample) and DDIM η = 1 with the exact score,
    n = 3000 samples at t = eps: mean α m and covariance diag(α² S + σ²) within 4 SE of the Richardson
    extrapolation over N = 100, 200 steps (plus the prior mismatch, < 1e-4)."""
    x_t = jax.random.normal(jax.random.PRNGKey(4), (3000, *SHAPE))
    runs = [flat(_run_sampler(sampler, x_t, grids.uniform(SDE_, steps + 1, EPS))) for steps in (100, 200)]
    a_e, c_e = coeffs(EPS)
    extra_mean, extra_cov = _prior_mismatch()
    assert_moments(runs[0], runs[1], a_e * M, np.diag(c_e), extra_mean, extra_cov, label=f"blurring {sampler}")


def test_log_snr_solvers_refuse_per_dimension_schedules():
    shape = (2, *SHAPE)
    ts = grids.uniform(SDE_, 8, EPS)
    x_t = jnp.zeros(shape)
    for solver in (DPMSolverPP(2), UniPC(2), HeunSolver(s_churn=10.0)):
        with pytest.raises(ValueError, match="per dimension"):
            sample_loop(solver, SDE_, exact_score(), jax.random.PRNGKey(0), x_t, ts, True)
    with pytest.raises(ValueError, match="per dimension"):
        sample("dpm_solver", jax.random.PRNGKey(0), SDE_, exact_score(), shape, num_steps=8)
    for grid in ("karras", "log_snr"):
        with pytest.raises(ValueError, match="per dimension"):
            grids.get_grid(grid, SDE_, 8)
    with pytest.raises(ValueError, match="per dimension"):
        SDE_.t_from_log_snr(jnp.zeros(3))


def _square_eps(params, x, labels, train=False, rng=None):
    return params * x**2


def test_frequency_network_sees_pixels():
    """A pixel-space ε-network (ε = p·x², not linear, so the basis matters) through `FrequencyNetwork`:
    score(u, t) = −C(p (Cᵀu)²)/σ."""
    u = jax.random.normal(jax.random.PRNGKey(7), (3, *SHAPE))
    t = jnp.array([0.2, 0.5, 0.9])
    score = get_score_fn(SDE_, FrequencyNetwork(SDE_, _square_eps), jnp.asarray(0.7))
    _, sigma = SDE_.marginal_coeffs(t)
    expected = -SDE_.from_pixels(0.7 * SDE_.to_pixels(u) ** 2) / sigma
    np.testing.assert_allclose(score(u, t), expected, rtol=1e-12)
    np.testing.assert_allclose(CosineLogSNRSDE().t_from_log_snr(CosineLogSNRSDE().log_snr(t)), t, rtol=1e-12)


def test_per_dimension_steps_broadcast_per_example_terms():
    """The pieces that mix a per-example term (Δt, the Langevin ratio r, RePaint's times) with per-frequency
    (α, σ, g) against their formulas: Euler–Maruyama x + f̄ Δt + g sqrt(−Δt) z, Langevin x + ε s + sqrt(2ε) z
    with ε_k = 2 (α_k(t)/α_k(t − T/N))² (snr r)², r = ‖z‖/‖s‖, and renoise (α_s/α_t) x + sqrt(σ_s² − (α_s σ_t/α_t)²) z."""
    rng = jax.random.PRNGKey(8)
    x = jax.random.normal(jax.random.PRNGKey(9), (3, *SHAPE))
    t, s = jnp.array([0.3, 0.5, 0.7]), jnp.array([0.25, 0.45, 0.6])
    z = jax.random.normal(rng, x.shape)
    score = exact_score()
    drift, g = SDE_.reverse(score).sde(x, t)
    got, _ = EulerMaruyama()(rng, SDE_, score, x, t, s)
    np.testing.assert_allclose(got, x + drift * (s - t)[:, None, None, None] + g * jnp.sqrt(t - s)[:, None, None, None] * z)
    got, _ = Langevin(snr=0.1)(rng, SDE_, score, x, t)
    sc = score(x, t)
    r = jnp.sqrt(jnp.sum(z**2, (1, 2, 3)) / jnp.sum(sc**2, (1, 2, 3)))[:, None, None, None]
    eps = 2.0 * (SDE_.marginal_coeffs(t)[0] / SDE_.marginal_coeffs(t - SDE_.T / SDE_.N)[0]) ** 2 * (0.1 * r) ** 2
    np.testing.assert_allclose(got, x + eps * sc + jnp.sqrt(2 * eps) * z)
    (a_t, s_t), (a_s, s_s) = SDE_.marginal_coeffs(s), SDE_.marginal_coeffs(t)  # re-noise s → t
    np.testing.assert_allclose(renoise(SDE_, rng, x, s, t), a_s / a_t * x + jnp.sqrt(s_s**2 - (a_s * s_t / a_t) ** 2) * z)


def _exact_eps(params, u, labels, train=False, rng=None):
    """ε̂ = E[ε | u_t] = σ (u − α m)/(α² S + σ²) of the Gaussian data, t = labels/999 (the plain "time" labels)."""
    return -SDE_.marginal_coeffs(labels / 999.0)[1] * exact_score()(u, labels / 999.0)


@pytest.mark.parametrize("likelihood_weighting", [False, True])
def test_dsm_loss_weights_each_frequency(likelihood_weighting):
    """The DSM loss on a per-dimension schedule weights every frequency by its own λ_k before the
    reduction: with the exact ε̂ of the Gaussian data, E[(ε̂ − ε)_k² | t] = α_k² S_k/(α_k² S_k + σ²), so
    each example's loss has mean mean_k λ_k(t) α_k² S_k/(α_k² S_k + σ²), λ_k = 1 (plain) or g_k²/σ²
    (likelihood weighting). Tested on the batch mean of (loss_i − that), 4 SE, 4000 examples."""
    from sdejax.losses import get_sde_loss_fn

    n = 4000
    u0 = jnp.asarray(M.reshape(SHAPE)) + jnp.sqrt(jnp.asarray(S.reshape(SHAPE))) * jax.random.normal(
        jax.random.PRNGKey(11), (n, *SHAPE))
    loss_fn = get_sde_loss_fn(SDE_, _exact_eps, train=False, likelihood_weighting=likelihood_weighting, eps=EPS)
    _, aux = loss_fn(None, jax.random.PRNGKey(12), {"x": u0})
    alpha, sigma = SDE_.marginal_coeffs(aux["t"])
    weight = SDE_.coefficients(aux["t"])[1] ** 2 / sigma**2 if likelihood_weighting else 1.0
    a2s = alpha**2 * jnp.asarray(S.reshape(SHAPE))
    expected = jnp.mean(weight * a2s / (a2s + sigma**2), axis=(1, 2, 3))
    gap = np.asarray(aux["losses"] - expected)
    assert abs(gap.mean()) < 4 * gap.std() / np.sqrt(n), (gap.mean(), gap.std() / np.sqrt(n))
