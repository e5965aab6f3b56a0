"""Inpainting, colorization and RePaint against Gaussian data, where p(x_unknown | x_known) is closed form.

For x ~ N(μ, Σ) with known block K and unknown block U: x_U | x_K = y ~ N(μ_U + Σ_UK Σ_KK⁻¹(y − μ_K),
Σ_UU − Σ_UK Σ_KK⁻¹ Σ_KU). When Σ_UK = 0 replacement is exact (the unknown block never sees the known
one), so the samples must match within Monte-Carlo error plus the sampler's discretisation bias,
measured in the same test as its error on the unconditional moments at the same step count. When the
blocks are correlated, replacement is biased (measured here) and RePaint's resampling must reduce it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdejax.analytic import GaussianMixture
from sdejax.sampling import inverse, methods
from sdejax.sampling.loop import resampling_moves
from sdejax.sde import VESDE, VPSDE

N = 8000
SDES = {"vp": VPSDE(), "ve": VESDE(sigma_max=20.0, N=200)}
RUNS = {  # one stochastic and one ODE solver per SDE, as the fixed-step samplers all run through the loop
    "vp_ddim": ("vp", "ddim", dict(num_steps=100, eta=1.0)),
    "vp_heun": ("vp", "heun", dict(num_steps=40)),
    "ve_pc": ("ve", "pc", dict(corrector="none")),
    "ve_dpm_solver": ("ve", "dpm_solver", dict(num_steps=40)),
}
MU = np.array([0.5, -0.3, 0.2, 0.1])
Y = np.array([1.0, -0.5])  # the known coordinates 0, 1


def conditional(mu, cov, k, u, y):
    """Mean and covariance of x_u | x_k = y."""
    gain = cov[np.ix_(u, k)] @ np.linalg.inv(cov[np.ix_(k, k)])
    return mu[u] + gain @ (y - mu[k]), cov[np.ix_(u, u)] - gain @ cov[np.ix_(k, u)]


def moment_errors(x, mean, cov):
    """|mean error| and |cov error| of samples x, and their standard errors (Gaussian formulas)."""
    d = np.diag(cov)
    se_m = np.sqrt(d / x.shape[0])
    se_c = np.sqrt((np.outer(d, d) + cov**2) / x.shape[0])
    return np.abs(x.mean(0) - mean), np.abs(np.cov(x.T) - cov), se_m, se_c


def known_first(n=N):
    data = jnp.zeros((n, 4)).at[:, :2].set(jnp.asarray(Y, jnp.float32))
    return inverse.inpainting(data, jnp.zeros((n, 4)).at[:, :2].set(1.0))


@pytest.mark.parametrize("run", list(RUNS))
def test_inpainting_is_exact_for_independent_blocks(run):
    """Σ block-diagonal: the unknown block's samples have the unconditional block moments within 4 SE
    plus the measured discretisation bias (the same sampler's unconditional moment error); the known
    block is returned exactly."""
    name, method, options = RUNS[run]
    sde = SDES[name]
    cov = np.array([[0.5, 0.2, 0, 0], [0.2, 0.4, 0, 0], [0, 0, 0.3, -0.1], [0, 0, -0.1, 0.6]])
    gm = GaussianMixture.create([1.0], [MU], covs=[cov])
    free, _ = methods.sample(method, jax.random.PRNGKey(1), sde, gm.score_fn(sde), (N, 4), **options)
    em, ec, _, _ = moment_errors(np.asarray(free, np.float64), MU, cov)
    bias_m, bias_c = em.max(), ec.max()  # discretisation bias (+ MC noise): measured, not assumed
    x, _ = methods.sample(method, jax.random.PRNGKey(2), sde, gm.score_fn(sde), (N, 4), constraint=known_first(),
                          **options)
    x = np.asarray(x, np.float64)
    np.testing.assert_array_equal(x[:, :2], np.broadcast_to(np.float32(Y), (N, 2)))
    m, c = conditional(MU, cov, [0, 1], [2, 3], Y)
    em, ec, se_m, se_c = moment_errors(x[:, 2:], m, c)
    np.testing.assert_array_less(em, 4 * se_m + bias_m)
    np.testing.assert_array_less(ec, 4 * se_c + bias_c)


def test_output_is_clean_where_unknown():
    """The returned unknown region is the denoised estimate, not the last noisy state: for an unknown
    block of standard deviation 1e-3 the output's variance is < 1e-5, while the noise σ(eps) ≈ 0.01 left
    by building the output from the noisy state (score_sde's inpainter) would give ≥ 1e-4."""
    sde = SDES["vp"]
    cov = np.diag([0.5, 0.4, 1e-6, 1e-6])
    gm = GaussianMixture.create([1.0], [MU], covs=[cov])
    x, _ = methods.sample("ddim", jax.random.PRNGKey(3), sde, gm.score_fn(sde), (N, 4), constraint=known_first(),
                          num_steps=50)
    assert float(sde.marginal_coeffs(jnp.array([sde.sampling_eps]))[1][0]) ** 2 > 1e-4
    assert np.max(np.var(np.asarray(x)[:, 2:], 0)) < 1e-5


def test_repaint_reduces_the_replacement_bias():
    """Correlated blocks (ρ = 0.9 between x_1 and x_3): plain replacement's conditional-mean error is
    many SE from zero; RePaint (jump 10, r = 10) reduces it by more than 4 combined SE."""
    sde = SDES["vp"]
    cov = np.array([[0.5, 0.1, 0.1, 0.0], [0.1, 1.0, 0.0, 0.9], [0.1, 0.0, 0.4, 0.0], [0.0, 0.9, 0.0, 1.0]])
    gm = GaussianMixture.create([1.0], [MU], covs=[cov])
    m, c = conditional(MU, cov, [0, 1], [2, 3], Y)
    errors = {}
    for rs in (None, (10, 10)):
        x, nfe = methods.sample("ddim", jax.random.PRNGKey(4), sde, gm.score_fn(sde), (N, 4), constraint=known_first(),
                                resample=rs, num_steps=100, eta=1.0)
        em, _, se_m, _ = moment_errors(np.asarray(x, np.float64)[:, 2:], m, c)
        errors[rs] = em[1], se_m[1]
        assert nfe == (100 if rs is None else 100 + 9 * 99)  # r − 1 = 9 extra passes over the 99 steps
    (plain, se_p), (repaint, se_r) = errors[None], errors[(10, 10)]
    assert plain > 10 * se_p, errors
    assert plain - repaint > 4 * np.hypot(se_p, se_r), errors


def test_colorization():
    """3 channels with z = M x independent between the gray coordinate and the colour ones (Σ = Mᵀ D M,
    D block-diagonal): the output's gray value mean(RGB) is the given one exactly (to rounding), M Mᵀ = I,
    and the colour coordinates have their closed-form moments within 4 SE plus the measured bias."""
    sde = SDES["vp"]
    mb = inverse.colorization_basis()
    np.testing.assert_allclose(mb @ mb.T, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(mb[0], np.ones(3) / np.sqrt(3))
    d = np.array([[0.6, 0, 0], [0, 0.3, 0.1], [0, 0.1, 0.5]])
    cov, mu = mb.T @ d @ mb, np.array([0.2, -0.1, 0.4])
    gm = GaussianMixture.create([1.0], [mu], covs=[cov])
    gray = jnp.full((N, 1), 0.7)
    x, _ = methods.sample("ddim", jax.random.PRNGKey(5), sde, gm.score_fn(sde), (N, 3),
                          constraint=inverse.colorization(gray), num_steps=100, eta=1.0)
    free, _ = methods.sample("ddim", jax.random.PRNGKey(6), sde, gm.score_fn(sde), (N, 3), num_steps=100, eta=1.0)
    x = np.asarray(x, np.float64)
    np.testing.assert_allclose(x.mean(-1), 0.7, atol=2e-6)
    z, zf = x @ mb.T, np.asarray(free, np.float64) @ mb.T
    bm, bc, _, _ = moment_errors(zf, mb @ mu, d)
    em, ec, se_m, se_c = moment_errors(z[:, 1:], (mb @ mu)[1:], d[1:, 1:])
    np.testing.assert_array_less(em, 4 * se_m + bm.max())
    np.testing.assert_array_less(ec, 4 * se_c + bc.max())


def test_resampling_moves_and_errors():
    """RePaint's walk: jump j, r resamples → r·j down moves per block and (r − 1)·j up moves, every
    down move of index i preceded (within its block) by the state at t_i."""
    idx, up = (np.asarray(v) for v in resampling_moves(7, 3, 2))
    assert list(idx) == [0, 1, 2, 2, 1, 0, 0, 1, 2, 3, 4, 5, 5, 4, 3, 3, 4, 5]
    assert list(up) == [0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0]
    level = 0
    for i, u in zip(idx, up):
        assert level == (i + 1 if u else i)
        level = i if u else i + 1
    assert level == 6
    sde = SDES["vp"]
    score = lambda x, t: -x  # noqa: E731
    with pytest.raises(ValueError, match="multistep"):
        methods.sample("dpm_solver", jax.random.PRNGKey(0), sde, score, (4, 4), num_steps=5,
                       constraint=known_first(4), resample=(2, 2))
    with pytest.raises(ValueError, match="jump >= 1"):
        methods.sample("ddim", jax.random.PRNGKey(0), sde, score, (4, 4), num_steps=5, resample=(0, 2))
    with pytest.raises(ValueError, match="mask must hold only 0"):
        inverse.inpainting(jnp.zeros((2, 4)), jnp.full((2, 4), 0.5))
