"""DDIM, annealed Langevin and plain Langevin against closed-form oracles.

The Gaussian oracle and its tolerance (Richardson extrapolation 2 m_2N − m_N within 4 of its SE, plus
the prior mismatch; the N-step run allowed its estimated bias) are those of `gaussian_oracle`. The
mixture 0.2·N((−5,−5), I) + 0.8·N((5,5), I) checks the NCSN argument: annealing recovers the weight 0.2, plain Langevin with the data score keeps the split of its init.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

from gaussian_oracle import (
    EPS, SDES, assert_moments, counted_score, denoised_target, isotropic_mixture_score, prior_mismatch, run_counted,
)
from sdejax import guidance
from sdejax.analytic import GaussianMixture
from sdejax.sampling.ddim import ddim_sample
from sdejax.sampling.langevin import annealed_langevin_sample, default_sigmas, langevin_sample, t_of_sigma
from sdejax.sampling.loop import NonFiniteError
from sdejax.score import tweedie_x0
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
    x, _ = ddim_sample(jax.random.PRNGKey(0), sde, guidance.threshold(sde, score, -0.4, 0.4), (256, 2), 10, eta=1.0)
    assert np.abs(np.asarray(x)).max() <= 0.4 + 1e-6
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


# --- non-finite scores ------------------------------------------------------------------------------
NAN_SDE = VESDE(sigma_min=0.05, sigma_max=20.0, N=10)
NAN_SIGMAS = np.geomspace(10.0, 0.1, 5)  # levels 1..5: σ = 10, 3.16, 1, 0.316, 0.1
NAN_MASK = np.array([True, False, True, False, False, True, False, False])  # 3 of 8 examples


def _score_nan_from_level_3(x, t):
    """−x/(1 + σ²), but NaN for the NAN_MASK examples once σ_t ≤ √(σ_2 σ_3) (levels 3..5)."""
    sigma = NAN_SDE.marginal_coeffs(t)[1]
    bad = (sigma <= np.sqrt(NAN_SIGMAS[1] * NAN_SIGMAS[2]))[:, None] & jnp.asarray(NAN_MASK)[:, None]
    return jnp.where(bad, jnp.nan, -x / (1 + sigma[:, None] ** 2))


def _finite_score(x, t):
    return -x / (1 + NAN_SDE.marginal_coeffs(t)[1][:, None] ** 2)


def test_annealed_langevin_names_the_level_of_a_nan_score():
    """A score NaN for 3 of 8 examples from level 3 on: NonFiniteError at level 3, its first step, 3 examples."""
    with pytest.raises(NonFiniteError, match=r"annealed_langevin_sample: non-finite score or state at noise level "
                                             r"3 of 5 \(sigma = 1\), step 1 of 2 in 3 of 8 examples"):
        annealed_langevin_sample(jax.random.PRNGKey(0), NAN_SDE, _score_nan_from_level_3, (8, 2), 2, 1e-2,
                                 sigmas=NAN_SIGMAS)
    init = jnp.zeros((8, 2)).at[4, 1].set(jnp.inf)
    with pytest.raises(NonFiniteError, match=r"in init in 1 of 8 examples"):
        annealed_langevin_sample(jax.random.PRNGKey(0), NAN_SDE, _finite_score, (8, 2), 2, 1e-2, init=init,
                                 sigmas=NAN_SIGMAS)
    with pytest.raises(NonFiniteError, match=r"langevin_sample: non-finite score or state at step 1 of 4 in 3 of 8"):
        langevin_sample(jax.random.PRNGKey(0), lambda x: jnp.where(jnp.asarray(NAN_MASK)[:, None], jnp.nan, -x),
                        jnp.zeros((8, 2)), 4, 0.1)


def test_the_watch_leaves_a_finite_run_bitwise_unchanged():
    """The samplers with the watch == the loops written here without it (the samplers before the watch,
    i.e. NCSN's step x ← x + (α_i/2) s(x, t_i) + √α_i z, α_i = step_lr σ_i²/σ_L², z from fold_in(rng, k)
    after the init key split, then Tweedie's step), bit for bit, denoise on and off."""
    rng, n_each, step_lr = jax.random.PRNGKey(7), 2, 1e-2
    sigmas = jnp.asarray(NAN_SIGMAS, jnp.float32)
    ts = t_of_sigma(NAN_SDE, NAN_SIGMAS)

    @functools.partial(jax.jit, static_argnames=("sde",))
    def by_hand(rng, score_fn, x, sigmas, ts, n_each, step_lr, *, sde):
        ones = jnp.ones(x.shape[:1], x.dtype)

        def body(k, x):
            i = k // n_each
            alpha = step_lr * (sigmas[i] / sigmas[-1]) ** 2
            z = jax.random.normal(jax.random.fold_in(rng, k), x.shape, x.dtype)
            return x + 0.5 * alpha * score_fn(x, ts[i] * ones) + jnp.sqrt(alpha) * z

        x = jax.lax.fori_loop(0, sigmas.shape[0] * n_each, body, x)
        return x, tweedie_x0(sde, score_fn, x, ts[-1] * ones)

    init_rng, loop_rng = jax.random.split(rng)
    x_init = NAN_SDE.prior_sampling(init_rng, (8, 2), jnp.float32)
    raw, denoised = by_hand(loop_rng, Partial(_finite_score), x_init, sigmas, ts, n_each, step_lr, sde=NAN_SDE)
    for denoise, expected in ((False, raw), (True, denoised)):
        got, nfe = annealed_langevin_sample(rng, NAN_SDE, _finite_score, (8, 2), n_each, step_lr, denoise=denoise,
                                            sigmas=NAN_SIGMAS)
        assert nfe == NAN_SIGMAS.size * n_each + denoise
        np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))

    @jax.jit
    def plain_by_hand(rng, x, step_size):
        return jax.lax.fori_loop(0, 4, lambda k, x: x + 0.5 * step_size * -x + jnp.sqrt(step_size) * jax.random.normal(
            jax.random.fold_in(rng, k), x.shape, x.dtype), x)

    x0 = jnp.linspace(-1.0, 1.0, 16).reshape(8, 2)
    np.testing.assert_array_equal(np.asarray(langevin_sample(rng, lambda x: -x, x0, 4, 0.1)[0]),
                                  np.asarray(plain_by_hand(rng, x0, 0.1)))
