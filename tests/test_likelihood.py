"""PF-ODE log-likelihood and bits/dim against closed-form Gaussian densities.

Data N(μ, Σ), d = 3, non-diagonal Σ; the exact marginal score. `logp − prior_logp(z) + log p_T(z)`
replaces the prior by the true p_T, so it must equal the closed-form log p_eps(x) up to the ODE
solve. With rtol = atol = 1e-6 (per example, float32) the solve error is ~1e-6 nats/dim; the test
asks for 1e-4 nats/dim. VE uses the default σ_max = 50: float32 suffices (measured ≤ 2e-6 nats/dim).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from sdejax.analytic import GaussianMixture
from sdejax.likelihood import bits_per_dim, dequantize, log_likelihood
from sdejax.sde import VESDE, VPSDE, subVPSDE
from counting import CountingScore

D = 3
_A = np.array([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [-0.3, 0.5, 0.7]])
GAUSS = GaussianMixture.create([1.0], [[0.5, -1.0, 2.0]], covs=[_A @ _A.T])
SDES = {"ve": VESDE(), "vp": VPSDE(), "subvp": subVPSDE()}
EPS = 1e-5


SCORES = {name: CountingScore(GAUSS, sde) for name, sde in SDES.items()}


def corrected(sde, logp, z):
    """logp with the prior swapped for the true p_T: logp − prior_logp(z) + log p_T(z)."""
    t = jnp.full(z.shape[:1], sde.T)
    return logp - sde.prior_logp(z) + GAUSS.marginal_log_prob(sde, z, t)


@pytest.mark.parametrize("name", list(SDES))
def test_exact_divergence_matches_closed_form(name):
    sde, score = SDES[name], SCORES[name]
    x = GAUSS.sample(jax.random.PRNGKey(0), 16)
    (logp, z, nfe), calls = score.run(
        log_likelihood, jax.random.PRNGKey(1), sde, score, x, divergence="exact", rtol=1e-6, atol=1e-6, eps=EPS
    )
    assert int(nfe) == calls
    assert logp.shape == (16,) and z.shape == x.shape
    true = GAUSS.marginal_log_prob(sde, x, jnp.full((16,), EPS))
    np.testing.assert_array_less(np.abs(corrected(sde, logp, z) - true) / D, 1e-4)


@pytest.mark.parametrize("divergence,num_probes", [("hutchinson_rademacher", 1), ("hutchinson_gaussian", 4)])
def test_hutchinson_is_unbiased(divergence, num_probes):
    """K = 64 copies of each of 16 points get independent probes in one solve; the mean of the K estimates
    is within 4 standard errors (their std / sqrt K) of the exact-divergence value. The solves use
    the same tolerance; their discretisation errors (~1e-5 nats) are far below the SE."""
    sde, score = SDES["vp"], SCORES["vp"]
    k, points = 64, GAUSS.sample(jax.random.PRNGKey(0), 16)
    exact, _, _ = log_likelihood(jax.random.PRNGKey(1), sde, score, points, divergence="exact", eps=EPS)
    copies = jnp.repeat(points, k, axis=0)
    (logp, _, nfe), calls = score.run(
        log_likelihood, jax.random.PRNGKey(3), sde, score, copies, divergence=divergence, num_probes=num_probes, eps=EPS
    )
    assert int(nfe) == calls
    draws = np.asarray(logp, np.float64).reshape(16, k)
    se = draws.std(axis=1, ddof=1) / np.sqrt(k)
    assert np.all(se > 0)
    np.testing.assert_array_less(np.abs(draws.mean(axis=1) - np.asarray(exact)), 4 * se)


def test_bad_arguments():
    sde, score = SDES["vp"], SCORES["vp"]
    x = jnp.zeros((2, D))
    with pytest.raises(ValueError, match="hutchinson_rademacher"):
        log_likelihood(jax.random.PRNGKey(0), sde, score, x, divergence="skilling")
    with pytest.raises(ValueError, match="num_probes"):
        log_likelihood(jax.random.PRNGKey(0), sde, score, x, num_probes=0)
    with pytest.raises(ValueError, match="tsit5"):
        log_likelihood(jax.random.PRNGKey(0), sde, score, x, solver="rk45")
    with pytest.raises(ValueError, match="data_range"):
        bits_per_dim(jnp.zeros(2), x.shape, data_range=(1.0, -1.0))


def test_bits_per_dim_bounds_discrete_code_length():
    """For 8-bit data and a smooth model density the dequantised bound E_U[bpd] ≥ −log₂ P(k)/D is
    tight: with a model N(0, 0.5²) per dimension on data centred to [−1, 1], the exact bin
    probabilities P(k) = Φ(upper edge) − Φ(lower edge) give −log₂ P(k)/D, and the Monte-Carlo mean of
    bits_per_dim over 4096 dequantisations exceeds it by no more than the Jensen gap plus 4 SE. Per
    dimension, expanding log p to second order in the offset δ ~ U[−h/2, h/2] within a bin of width
    h = 2/256, the gap log E[p] − E[log p] is (log p)'² h²/24 ≤ (1/0.5²)² h²/24 = 4.1e-5 nats
    = 5.9e-5 bits (|y| ≤ 1), below the 1e-4 allowed."""
    n_bits, lo, hi, std = 8, -1.0, 1.0, 0.5
    pixels = jnp.array([[3, 100, 128, 200]])
    dims = pixels.shape[1]
    reps = 4096
    y = dequantize(jax.random.PRNGKey(0), jnp.repeat(pixels, reps, axis=0), n_bits, (lo, hi))
    assert np.all(np.floor((np.asarray(y) - lo) / (hi - lo) * 2**n_bits) == np.asarray(pixels))
    logp = jnp.sum(jax.scipy.stats.norm.logpdf(y, scale=std), axis=1)
    bpd = np.asarray(bits_per_dim(logp, y.shape, (lo, hi), n_bits), np.float64)
    edges = lo + (hi - lo) * np.stack([pixels[0], pixels[0] + 1]) / 2**n_bits
    exact = -np.sum(np.log2(np.diff(stats.norm.cdf(edges, scale=std), axis=0))) / dims
    se = bpd.std() / np.sqrt(reps)
    assert bpd.mean() >= exact - 4 * se
    assert bpd.mean() - exact < 1e-4 + 4 * se


def test_bits_per_dim_conversion():
    """A model uniform on the data range has p_u = 1, so 8-bit data cost exactly 8 bits/dim and
    continuous data 0; data centred to [−1, 1] shift the raw −logp/(D log 2) by n − 1 = 7."""
    shape = (2, 3, 4, 4)
    dims = 48
    uniform = jnp.full((2,), -dims * np.log(2.0))  # density 2^-D on [−1, 1]^D
    np.testing.assert_allclose(bits_per_dim(uniform, shape, (-1.0, 1.0), 8), 8.0, rtol=1e-6)
    np.testing.assert_allclose(bits_per_dim(uniform, shape, (-1.0, 1.0), None), 0.0, atol=1e-6)
    logp = jnp.array([-100.0, 50.0])
    np.testing.assert_allclose(bits_per_dim(logp, shape, (-1.0, 1.0)), -logp / (dims * np.log(2)) + 7, rtol=1e-6)
    np.testing.assert_allclose(bits_per_dim(logp, shape, (0.0, 1.0)), -logp / (dims * np.log(2)) + 8, rtol=1e-6)
