"""Diffrax samplers (probability-flow ODE, reverse SDE) against closed-form Gaussian oracles.

Data N(μ, Σ) with non-diagonal Σ in d = 2. With the exact score both samplers are linear maps of
the prior draw, so the law of their output is known in closed form even though the prior
N(0, s² I) is not exactly p_T (see `pushforward_moments`). Each check is `gaussian_oracle`'s
Richardson check: with m(h) the sample mean or covariance at step (or tolerance) h and m(h/r) a rerun
on the same noise, the first-order extrapolation E = (r m(h/r) − m(h))/(r − 1) must match the exact
moments within 4 of its Monte-Carlo standard errors (from the paired per-example terms), and each
run is allowed its estimated bias m − E on top of 4 of its own standard errors:

- adaptive solves: tolerance ratio r = 10 on the same latent (ODE) or the same Brownian tree (reverse
  SDE), so the pairs are nearly identical and SE(E) ≈ SE(m). The extrapolation takes the error ∝ tol
  (measured for the reverse SDE on these Gaussians at rtol = atol = 1e-2, 1e-3, 1e-4: successive
  differences shrink 16–25×, i.e. tol^1.2–1.4; the differences, ≤ 2e-3, are far below the 0.03 SE).
  The reverse SDE pairs (1e-2, 1e-3): the tested default 1e-3 is the fine run.
- fixed-step Euler–Maruyama (weak order 1), N = 100 and 2N steps, r = 2: E = 2 m_2N − m_N. Same key,
  so the same prior draw (the increments are drawn independently per step: SE(E) ≈ √5 SE(m) at worst).

Every score function here counts its real evaluations with a host callback; each test also checks
the reported NFE against that count.
"""
from __future__ import annotations

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from counting import CountingScore
from gaussian_oracle import assert_moments
from sdejax.analytic import GaussianMixture
from sdejax.sampling.ode import ode_encode, ode_sample
from sdejax.sampling.sde import sde_sample
from sdejax.sde import VESDE, VPSDE, subVPSDE

MU = np.array([1.0, -2.0])
SIGMA = np.array([[2.0, 1.6], [1.6, 2.0]])
GAUSS = GaussianMixture.create([1.0], [MU], covs=[SIGMA])
SDES = {"ve": VESDE(), "vp": VPSDE(), "subvp": subVPSDE()}
EPS = 1e-3
N_SAMPLES = 2000


SCORES = {name: CountingScore(GAUSS, sde) for name, sde in SDES.items()}


def pushforward_moments(sde, stochastic: bool) -> tuple[np.ndarray, np.ndarray]:
    """Exact mean and covariance at t = EPS of the sampler started from the prior N(0, s² I).

    p_t = N(m_t, C_t), m_t = α_t μ, C_t = α_t² Σ + σ_t² I; all C_t share Σ's eigenvectors, so work
    per eigenvalue. dC/dt = 2fC + g² gives for the ODE the flow x_ε − m_ε = k (x_T − m_T) with
    k = sqrt(C_ε/C_T); for the reverse SDE the mean deviation decays by k = (C_ε/C_T)(α_T/α_ε) and the
    covariance excess C − P by k², so Cov = C_ε + (s² − C_T) k² (and s² k² for the ODE).
    """
    lam, u = np.linalg.eigh(SIGMA)
    times = jnp.array([EPS, sde.T])
    (a0, at), (s0, st) = (np.asarray(v, np.float64) for v in sde.marginal_coeffs(times))
    c0, ct = a0**2 * lam + s0**2, at**2 * lam + st**2
    k = (c0 / ct) * (at / a0) if stochastic else np.sqrt(c0 / ct)
    var = c0 + (sde.prior_std**2 - ct) * k**2 if stochastic else sde.prior_std**2 * k**2
    mean = a0 * MU - u @ (k * (u.T @ (at * MU)))
    return mean, u @ np.diag(var) @ u.T


@pytest.mark.parametrize("name", list(SDES))
def test_ode_sample_gaussian_moments_and_nfe(name):
    sde, score = SDES[name], SCORES[name]
    rng = jax.random.PRNGKey(0)
    (x, nfe), calls = score.run(ode_sample, rng, sde, score, (N_SAMPLES, 2))
    assert int(nfe) == calls
    (x_fine, _), _ = score.run(ode_sample, rng, sde, score, (N_SAMPLES, 2), rtol=1e-6, atol=1e-6)
    assert_moments(x, x_fine, *pushforward_moments(sde, stochastic=False), label=f"{name} ode", ratio=10.0)


def test_ode_sample_denoise_is_tweedie_and_costs_one_evaluation():
    """denoise returns E[x_0 | x_eps] = μ + α Σ C_eps⁻¹ (x − α μ) (Gaussian data) of the ODE output."""
    sde, score = SDES["vp"], SCORES["vp"]
    rng = jax.random.PRNGKey(0)
    (x, nfe), _ = score.run(ode_sample, rng, sde, score, (N_SAMPLES, 2))
    (x0, nfe0), calls = score.run(ode_sample, rng, sde, score, (N_SAMPLES, 2), denoise=True)
    assert int(nfe0) == calls == int(nfe) + 1
    alpha, sigma = (float(v[0]) for v in sde.marginal_coeffs(jnp.array([EPS])))
    gain = alpha * SIGMA @ np.linalg.inv(alpha**2 * SIGMA + sigma**2 * np.eye(2))
    expected = MU + (np.asarray(x, np.float64) - alpha * MU) @ gain.T
    np.testing.assert_allclose(x0, expected, atol=1e-4)


def test_ode_sample_accepts_solver_instances_and_names():
    sde, score = SDES["vp"], SCORES["vp"]
    rng = jax.random.PRNGKey(1)
    z = sde.prior_sampling(rng, (64, 2))
    (a, nfe_a), calls = score.run(ode_sample, rng, sde, score, (64, 2), solver=diffrax.Dopri5(), z=z)
    assert int(nfe_a) == calls
    (b, nfe_b), calls = score.run(ode_sample, rng, sde, score, (64, 2), solver="bosh3", z=z)
    assert int(nfe_b) == calls
    # Both solve the same ODE from the same latent to rtol = atol = 1e-5: agree to ~10 tol.
    np.testing.assert_allclose(a, b, atol=1e-3)
    with pytest.raises(ValueError, match="tsit5"):
        ode_sample(rng, sde, score, (64, 2), solver="rk4")
    with pytest.raises(ValueError, match="z must have shape"):
        ode_sample(rng, sde, score, (64, 2), z=z[:10])


def test_ode_encode_decode_round_trip():
    """decode(encode(x)) = x up to the two solves' errors. Worst case, each step's local error
    (≤ atol + rtol·|y| ≤ 1e-5·(1 + 5) near the data, |x| ≲ 5) adds up over the ~20 Tsit5 steps of
    each solve (errors made near z are contracted on the way back, by sqrt(C_eps/C_T) ≈ 1/35): well
    under 1e-2 (measured: 1e-5). The latents must also look like the prior (std ≈ σ_max)."""
    sde, score = SDES["ve"], SCORES["ve"]
    x = GAUSS.sample(jax.random.PRNGKey(2), 500)
    (z, nfe_enc), calls = score.run(ode_encode, sde, score, x)
    assert int(nfe_enc) == calls
    ((x_back, _), _) = score.run(ode_sample, None, sde, score, x.shape, z=z)
    np.testing.assert_allclose(x_back, x, atol=1e-2)
    assert abs(float(jnp.std(z)) / sde.prior_std - 1) < 0.1


def test_ode_recovers_mixture_weight():
    """0.2 N((−5,−5), I) + 0.8 N((5,5), I): the fraction of ODE samples with x₁ + x₂ < 0 is the
    weight 0.2 (the modes are 14σ apart), within ±0.03 (4 SE of a proportion over 2000 is 0.036;
    the exact flow from the VP prior reproduces the weight up to α_T ≈ 7e-3)."""
    mix = GaussianMixture.create([0.2, 0.8], [[-5.0, -5.0], [5.0, 5.0]])
    sde = VPSDE()
    score = CountingScore(mix, sde)
    (x, nfe), calls = score.run(ode_sample, jax.random.PRNGKey(3), sde, score, (N_SAMPLES, 2))
    assert int(nfe) == calls
    weight = float(jnp.mean(jnp.sum(x, axis=1) < 0))
    assert abs(weight - 0.2) < 0.03


@pytest.mark.parametrize("name", list(SDES))
def test_sde_sample_fixed_steps(name):
    sde, score = SDES[name], SCORES[name]
    steps = 100
    (x, nfe), calls = score.run(sde_sample, jax.random.PRNGKey(4), sde, score, (N_SAMPLES, 2), num_steps=steps)
    assert int(nfe) == calls == steps
    (x2, _), _ = score.run(sde_sample, jax.random.PRNGKey(4), sde, score, (N_SAMPLES, 2), num_steps=2 * steps)
    assert_moments(x, x2, *pushforward_moments(sde, stochastic=True), label=f"{name} euler-maruyama {steps}")


@pytest.mark.parametrize("name", list(SDES))
def test_sde_sample_adaptive(name):
    sde, score = SDES[name], SCORES[name]
    rng = jax.random.PRNGKey(6)
    (x, nfe), calls = score.run(sde_sample, rng, sde, score, (N_SAMPLES, 2))
    assert int(nfe) == calls
    (x_coarse, _), _ = score.run(sde_sample, rng, sde, score, (N_SAMPLES, 2), rtol=1e-2, atol=1e-2)
    assert_moments(x_coarse, x, *pushforward_moments(sde, stochastic=True), label=f"{name} adaptive sde", ratio=10.0)


def test_sde_sample_bad_arguments():
    sde, score = SDES["vp"], SCORES["vp"]
    rng = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="shark"):
        sde_sample(rng, sde, score, (8, 2), solver="milstein")
    with pytest.raises(ValueError, match="num_steps"):
        sde_sample(rng, sde, score, (8, 2), num_steps=0)
