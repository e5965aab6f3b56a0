"""SDEs against the original score_sde outputs, their discrete-time definitions, and simulation."""
import diffrax
import jax
import jax.numpy as jnp
import lineax
import numpy as np
import pytest

from sdejax.sde import VESDE, VPSDE, get_sde, subVPSDE

CASES = [("vesde", VESDE, 1000), ("vesde", VESDE, 10), ("vpsde", VPSDE, 1000),
         ("subvpsde", subVPSDE, 1000), ("subvpsde", subVPSDE, 10)]


def reference_score(sde):
    """The analytic score the fixtures were made with: −x / (1 + std(t)²)."""
    def score_fn(x, t):
        std = sde.marginal_prob(jnp.zeros_like(x), t)[1]
        return -x / (1 + std[:, None, None, None] ** 2)
    return score_fn


@pytest.mark.parametrize("name,cls,n", CASES, ids=[f"{c[0]}_N{c[2]}" for c in CASES])
def test_matches_reference_f64(fixtures_dir, name, cls, n):
    """Every float64 key of the original's outputs within rtol 1e-5, atol 1e-6·max|ref|."""
    ref = np.load(fixtures_dir / "reference" / f"sde_{name}_N{n}.npz")
    with jax.enable_x64(True):
        sde = cls(N=n)
        x, t, z, td = (ref[k].astype(np.float64) for k in ("x", "t", "z", "t_discretize"))
        ours = {}
        ours["sde_drift"], ours["sde_diffusion"] = sde.sde(x, t)
        ours["marginal_mean"], ours["marginal_std"] = sde.marginal_prob(x, t)
        ours["prior_logp"] = sde.prior_logp(z)
        ours["discretize_f"], ours["discretize_G"] = sde.discretize(x, td)
        ours["score_analytic"] = reference_score(sde)(x, t)
        for pf, tag in [(False, "sde"), (True, "ode")]:
            rev = sde.reverse(reference_score(sde), probability_flow=pf)
            ours[f"reverse_{tag}_drift"], ours[f"reverse_{tag}_diffusion"] = rev.sde(x, t)
            ours[f"reverse_{tag}_discretize_f"], ours[f"reverse_{tag}_discretize_G"] = rev.discretize(x, td)
        if name == "vesde":
            ours["table_discrete_sigmas"] = sde.discrete_sigmas
        if name == "vpsde":
            ours["table_discrete_betas"] = sde.discrete_betas
            ours["table_alphas_cumprod"] = sde.alphas_cumprod
        np.testing.assert_array_equal(sde.time_index(td), ref["discretize_index"])
        for key, value in ours.items():
            expected = ref[f"f64/{key}"]
            np.testing.assert_allclose(np.asarray(value), expected, rtol=1e-5,
                                       atol=1e-6 * np.abs(expected).max(), err_msg=key)


def test_vp_discrete_betas_reaching_one_is_an_error():
    with pytest.raises(ValueError, match="beta"):
        VPSDE(beta_min=0.1, beta_max=20.0, N=10)


def _chain_moments(sde, t_grid):
    """Propagate mean coefficient and variance of the linear chain x_{i+1} = x_i + f(x_i) + G z."""
    with jax.enable_x64(True):
        coef, var = 1.0, 0.0
        coefs, variances = [], []
        one = jnp.ones((1, 1))
        for t in t_grid:
            f, g = sde.discretize(one, jnp.array([t]))
            c = 1.0 + float(f[0, 0])  # f is linear in x: f = (c − 1) x
            coef, var = c * coef, c**2 * var + float(g[0]) ** 2
            coefs.append(coef)
            variances.append(var)
    return np.array(coefs), np.array(variances)


def test_vp_discretize_is_the_ddpm_chain():
    """x_{i+1} = sqrt(1 − β_i) x_i + sqrt(β_i) z gives x_i = sqrt(ᾱ_i) x_0 + sqrt(1 − ᾱ_i) z."""
    sde = VPSDE(N=100)
    grid = (np.arange(sde.N) + 0.5) / (sde.N - 1)
    grid[-1] = 1.0
    coefs, variances = _chain_moments(sde, grid)
    abar = np.cumprod(1 - np.linspace(0.1 / 100, 20 / 100, 100))
    np.testing.assert_allclose(coefs, np.sqrt(abar), rtol=1e-12)
    np.testing.assert_allclose(variances, 1 - abar, rtol=1e-12)


def test_ve_discretize_is_the_smld_chain():
    """x_i = x_{i−1} + sqrt(σ_i² − σ_{i−1}²) z gives x_i = x_0 + σ_i z, σ_i geometric."""
    sde = VESDE(sigma_min=0.01, sigma_max=50.0, N=100)
    grid = (np.arange(sde.N) + 0.5) / (sde.N - 1)
    grid[-1] = 1.0
    coefs, variances = _chain_moments(sde, grid)
    sigmas = np.exp(np.linspace(np.log(0.01), np.log(50.0), 100))
    np.testing.assert_allclose(coefs, 1.0)
    np.testing.assert_allclose(variances, sigmas**2, rtol=1e-10)


@pytest.mark.parametrize("sde", [VESDE(sigma_min=0.05, sigma_max=5.0), VPSDE(), subVPSDE()],
                         ids=["ve", "vp", "subvp"])
def test_marginal_prob_matches_simulation(sde):
    """Euler–Maruyama paths of the forward SDE from x_0 (VE: from x_0 + σ_min z) reach the stated
    marginal at t = 0.6: mean and variance within 4 Monte-Carlo standard errors plus the Euler bias.

    The bias is measured by halving the step on the same Brownian paths (VirtualBrownianTree):
    Euler–Maruyama has weak order 1, so |bias(h)| ≈ |m_h − m_{h/2}| · 2; we allow that bound.
    """
    n, d, t1 = 4000, 2, 0.6
    x0 = jnp.array([1.5, -0.5])
    key = jax.random.PRNGKey(0)
    alpha0, sigma0 = sde.marginal_coeffs(jnp.zeros(1))  # σ_min for VE, 0 for VP/sub-VP
    starts = x0 + sigma0[0] * jax.random.normal(jax.random.PRNGKey(1), (n, d))

    def drift(t, y, args):
        return sde.sde(y[None], jnp.full((1,), t))[0][0]

    def diffusion(t, y, args):
        return sde.sde(y[None], jnp.full((1,), t))[1][0] * jnp.ones(d)

    @jax.jit
    def simulate(keys, y0, dt):
        def one(k, y):
            bm = diffrax.VirtualBrownianTree(0.0, t1, tol=1e-3 * dt, shape=(d,), key=k)
            noise = diffrax.ControlTerm(lambda t, y, a: lineax.DiagonalLinearOperator(diffusion(t, y, a)), bm)
            terms = diffrax.MultiTerm(diffrax.ODETerm(drift), noise)
            return diffrax.diffeqsolve(terms, diffrax.Euler(), 0.0, t1, dt, y).ys[-1]
        return jax.vmap(one)(keys, y0)

    keys = jax.random.split(key, n)
    coarse = simulate(keys, starts, t1 / 60)
    fine = simulate(keys, starts, t1 / 120)
    mean, std = sde.marginal_prob(x0[None], jnp.array([t1]))
    mean, var = np.asarray(mean[0]), float(std[0]) ** 2
    m_hat, v_hat = np.asarray(fine.mean(0)), np.asarray(fine.var(0))
    bias_m = 2 * np.abs(m_hat - np.asarray(coarse.mean(0)))
    bias_v = 2 * np.abs(v_hat - np.asarray(coarse.var(0)))
    se_m, se_v = np.sqrt(var / n), var * np.sqrt(2 / (n - 1))
    assert np.all(np.abs(m_hat - mean) < 4 * se_m + bias_m), (m_hat, mean, se_m, bias_m)
    assert np.all(np.abs(v_hat - var) < 4 * se_v + bias_v), (v_hat, var, se_v, bias_v)


def test_shapes_and_names_are_checked():
    sde = VPSDE()
    x = jnp.zeros((4, 3))
    with pytest.raises(ValueError, match=r"t must have shape \(batch,\)"):
        sde.sde(x, jnp.zeros((4, 1)))
    with pytest.raises(ValueError, match=r"t must have shape"):
        sde.marginal_prob(x, jnp.zeros(3))
    with pytest.raises(ValueError, match="valid names"):
        get_sde("cosine")
    assert isinstance(get_sde("VESDE", sigma_max=10.0), VESDE)


def test_sdes_are_static_and_jittable():
    """SDEs pass through jit as static pytrees; the reverse object keeps sde/discretize."""
    for sde in (VESDE(), VPSDE(), subVPSDE()):
        assert jax.tree_util.tree_leaves(sde) == []
        x, t = jnp.ones((2, 3)), jnp.array([0.2, 0.7])
        mean, std = jax.jit(lambda s, x, t: s.marginal_prob(x, t))(sde, x, t)
        np.testing.assert_allclose(mean, sde.marginal_prob(x, t)[0], rtol=1e-6)
        rev = sde.reverse(lambda x, t: -x)
        assert rev.N == sde.N and rev.T == sde.T
        assert rev.discretize(x, t)[0].shape == x.shape
