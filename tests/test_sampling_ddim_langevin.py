"""DDIM, annealed Langevin and plain Langevin against closed-form oracles.

The Gaussian oracle and its tolerance (Richardson extrapolation 2 m_2N − m_N within 4 of its SE, plus
the prior mismatch; the N-step run allowed its estimated bias) are those of `gaussian_oracle`. The
mixture 0.2·N((−5,−5), I) + 0.8·N((5,5), I) checks the NCSN argument: annealing recovers the weight 0.2, plain Langevin with the data score keeps the split of its init.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gaussian_oracle import (
    EPS, SDES, assert_moments, counted_score, denoised_target, isotropic_mixture_score, prior_mismatch, run_counted,
)
from sdejax.analytic import GaussianMixture
from sdejax.sampling.ddim import ddim_sample
from sdejax.sampling.langevin import annealed_langevin_sample, default_sigmas, langevin_sample, t_of_sigma
from sdejax.sde import VESDE, VPSDE

MIXTURE = GaussianMixture.create([0.2, 0.8], [[-5.0, -5.0], [5.0, 5.0]])
N_MIX = 3000  # SE of the weight: sqrt(0.2·0.8/3000) = 0.0073, so ±0.03 is 4.1 SE


def weight_of_first_mode(x) -> float:
    """Fraction of samples nearer (−5,−5) (sign of x₁ + x₂; the modes are 10√2 std apart)."""
    return float(np.mean(np.asarray(x).sum(-1) < 0))


def uniform_init(rng):
    return jax.random.uniform(rng, (N_MIX, 2), minval=-8.0, maxval=8.0)


@pytest.mark.parametrize("kind", ["ve", "vp", "subvp"])
def test_ddim_matches_gaussian(kind):
    """η = 0 and η = 1, num_steps N = 100 vs 2N from the same prior draw (a compile each: the grid length
    and η are static)."""
    sde = SDES[kind](100)
    score = counted_score(sde, 2)
    mean, cov = denoised_target(sde, 2)
    mis_m, mis_c = prior_mismatch(sde, 2)
    for eta in (0.0, 1.0):
        runs = []
        for n in (100, 200):
            x, nfe, calls = run_counted(ddim_sample, jax.random.PRNGKey(0), sde, score, (4000, 2), n, eta=eta, eps=EPS)
            assert nfe == calls == n
            runs.append(x)
        assert_moments(*runs, mean, cov, mis_m, mis_c, f"{kind} ddim eta={eta}")


def test_ddim_clip_and_errors():
    sde = VPSDE(N=50)
    score = counted_score(sde, 2)
    x, _, _ = run_counted(ddim_sample, jax.random.PRNGKey(0), sde, score, (256, 2), 10, eta=1.0, clip_x0=(-0.4, 0.4))
    assert np.abs(x).max() <= 0.4
    with pytest.raises(ValueError, match="eta"):
        ddim_sample(jax.random.PRNGKey(0), sde, score, (2, 2), 10, eta=1.5)
    with pytest.raises(ValueError, match="num_steps"):
        ddim_sample(jax.random.PRNGKey(0), sde, score, (2, 2), 1)


def test_t_of_sigma_inverts_marginal_coeffs():
    sde = VESDE(sigma_min=0.01, sigma_max=50.0, N=30)
    np.testing.assert_allclose(default_sigmas(sde), sde.discrete_sigmas[::-1], rtol=1e-5)
    sigmas = np.geomspace(20.0, 0.1, 7)
    ts = t_of_sigma(sde, sigmas)
    np.testing.assert_allclose(np.asarray(sde.sigma(ts)), sigmas, rtol=1e-5)
    with pytest.raises(ValueError, match="sigmas must lie in"):
        t_of_sigma(sde, [100.0])


def test_annealed_langevin_needs_variance_exploding_sde():
    with pytest.raises(ValueError, match="variance-exploding"):
        annealed_langevin_sample(jax.random.PRNGKey(0), VPSDE(N=50), lambda x, t: -x, (2, 2), 1, 1e-3)
    with pytest.raises(ValueError, match="init must have shape"):
        annealed_langevin_sample(jax.random.PRNGKey(0), VESDE(N=10), lambda x, t: -x, (2, 2), 1, 1e-3,
                                 init=jnp.zeros((3, 2)))


def test_annealed_langevin_nfe_counts_calls():
    sde = VESDE(sigma_min=0.1, sigma_max=20.0, N=4)
    _, nfe, calls = run_counted(annealed_langevin_sample, jax.random.PRNGKey(0), sde, counted_score(sde, 2),
                                (3, 2), 5, 1e-3)
    assert nfe == calls == 4 * 5 + 1


def test_annealed_langevin_recovers_mixture_weight():
    """NCSN on the mixture: σ geometric from 20 to 0.1 (L = 50), T = 100 steps per level, init uniform on
    [−8, 8]². step_lr = 2e-3 keeps NCSN's ratio α_i/σ_i² = ε/σ_L² = 2e-5/0.01² = 0.2 (at σ_L = 0.1).
    The SDE (σ_min = 0.01, σ_max = 50) only supplies the score; the σ grid is passed explicitly and
    mapped to times by bisection.
    """
    sde = VESDE(sigma_min=0.01, sigma_max=50.0, N=1000)
    score = isotropic_mixture_score(sde, MIXTURE.weights, MIXTURE.means)
    init_rng, rng = jax.random.split(jax.random.PRNGKey(0))
    x, nfe = annealed_langevin_sample(rng, sde, score, (N_MIX, 2), 100, 2e-3, init=uniform_init(init_rng),
                                      sigmas=np.geomspace(20.0, 0.1, 50))
    w = weight_of_first_mode(x)
    print(f"annealed Langevin weight {w:.4f} (nfe {nfe})")
    assert nfe == 50 * 100 + 1
    assert abs(w - 0.2) <= 0.03


def test_plain_langevin_keeps_init_split():
    """Plain Langevin with the data score, same init, 1000 steps of size 0.1 (≈ 50 relaxation times
    inside a mode): the samples find the nearer mode and stay, the mode weights are frozen at the init's
    split. The boundary of the two basins is x₁ + x₂ = −log(4)/10 ≈ −0.14, so the init puts ≈ 0.49 of its
    mass on the (−5,−5) side, and crossing the gap (density ≈ e^{−25} of the modes' peaks) never happens.
    Assert |w − 0.5| < 0.1 (≥ 17 SE from 0.2, the true weight)."""
    marginal = isotropic_mixture_score(VPSDE(), MIXTURE.weights, MIXTURE.means)  # at t = 0: α = 1, σ = 0
    init_rng, rng = jax.random.split(jax.random.PRNGKey(0))
    x, nfe = langevin_sample(rng, lambda x: marginal(x, jnp.zeros(x.shape[:1])), uniform_init(init_rng), 1000, 0.1)
    w = weight_of_first_mode(x)
    print(f"plain Langevin weight {w:.4f}")
    assert nfe == 1000
    assert abs(w - 0.5) < 0.1
    assert np.all(np.abs(np.asarray(x)) < 12)  # converged into the modes
