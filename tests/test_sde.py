"""SDEs against the original score_sde outputs, their discrete-time definitions, and simulation."""
import diffrax
import jax
import jax.numpy as jnp
import lineax
import numpy as np
import pytest

from sdejax.discrete import DiscreteVPSDE, beta_table
from sdejax.sde import SDE, EDMSDE, VESDE, VPSDE, CosineVPSDE, get_sde, subVPSDE

ALL_SDES = (VESDE(), VPSDE(), subVPSDE(), CosineVPSDE(), EDMSDE(), DiscreteVPSDE.from_beta_schedule("linear"))

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


def test_vp_discrete_betas_reaching_one_is_an_error_only_for_the_chain():
    """VPSDE(N=10) is a valid continuous schedule; only its DDPM chain (β_max/N ≥ 1) is undefined."""
    sde = VPSDE(beta_min=0.1, beta_max=20.0, N=10)
    np.testing.assert_allclose(sde.marginal_coeffs(jnp.array([0.5]))[0], VPSDE().marginal_coeffs(jnp.array([0.5]))[0])
    with pytest.raises(ValueError, match="beta"):
        sde.discretize(jnp.ones((1, 2)), jnp.array([0.5]))


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


@pytest.mark.parametrize("sde,t1", [(VESDE(sigma_min=0.05, sigma_max=5.0), 0.6), (VPSDE(), 0.6), (subVPSDE(), 0.6),
                                    (CosineVPSDE(), 0.6), (EDMSDE(sigma_min=0.05, sigma_max=5.0), 2.0)],
                         ids=["ve", "vp", "subvp", "cosine", "edm"])
def test_marginal_prob_matches_simulation(sde, t1):
    """Euler–Maruyama paths of the forward SDE from x_0 at t_min (VE/EDM: from x_0 + σ(t_min) z) reach
    the stated marginal at t1: mean and variance within 4 Monte-Carlo standard errors plus the Euler bias.
    For the cosine and EDM schedules the drift and diffusion are the ones derived from marginal_coeffs.

    The bias is measured by halving the step on the same Brownian paths (VirtualBrownianTree):
    Euler–Maruyama has weak order 1, so |bias(h)| ≈ |m_h − m_{h/2}| · 2; we allow that bound.
    """
    n, d, t0 = 4000, 2, sde.t_min
    x0 = jnp.array([1.5, -0.5])
    key = jax.random.PRNGKey(0)
    alpha0, sigma0 = sde.marginal_coeffs(jnp.full(1, t0))  # σ_min for VE/EDM, 0 for VP/sub-VP/cosine
    starts = x0 + sigma0[0] * jax.random.normal(jax.random.PRNGKey(1), (n, d))

    def drift(t, y, args):
        return sde.sde(y[None], jnp.full((1,), t))[0][0]

    def diffusion(t, y, args):
        return sde.sde(y[None], jnp.full((1,), t))[1][0] * jnp.ones(d)

    @jax.jit
    def simulate(keys, y0, dt):
        def one(k, y):
            bm = diffrax.VirtualBrownianTree(t0, t1, tol=1e-3 * dt, shape=(d,), key=k)
            noise = diffrax.ControlTerm(lambda t, y, a: lineax.DiagonalLinearOperator(diffusion(t, y, a)), bm)
            terms = diffrax.MultiTerm(diffrax.ODETerm(drift), noise)
            return diffrax.diffeqsolve(terms, diffrax.Euler(), t0, t1, dt, y).ys[-1]
        return jax.vmap(one)(keys, y0)

    keys = jax.random.split(key, n)
    coarse = simulate(keys, starts, (t1 - t0) / 60)
    fine = simulate(keys, starts, (t1 - t0) / 120)
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
        get_sde("cosine_schedule")
    assert isinstance(get_sde("VESDE", sigma_max=10.0), VESDE)


def test_sdes_are_static_and_jittable():
    """SDEs pass through jit as static pytrees; the reverse object keeps sde/discretize."""
    for sde in ALL_SDES:
        assert jax.tree_util.tree_leaves(sde) == []
        x, t = jnp.ones((2, 3)), jnp.array([0.2, 0.7])
        mean, std = jax.jit(lambda s, x, t: s.marginal_prob(x, t))(sde, x, t)
        np.testing.assert_allclose(mean, sde.marginal_prob(x, t)[0], rtol=1e-6)
        rev = sde.reverse(lambda x, t: -x)
        assert rev.N == sde.N and rev.T == sde.T
        assert rev.discretize(x, t)[0].shape == x.shape


@pytest.mark.parametrize("sde", ALL_SDES, ids=lambda s: type(s).__name__)
def test_derived_quantities_agree_with_closed_forms(sde):
    """The generic derivations in `SDE` (f, g from marginal_coeffs by jvp; t(λ) by bisection) equal the
    closed forms each schedule overrides them with, in float64 to 1e-9 relative (both are exact formulas;
    the bisection runs 64 halvings of [t_min, T], far below that)."""
    with jax.enable_x64(True):
        t = jnp.linspace(sde.t_min + 0.01 * sde.T, sde.T, 9, dtype=jnp.float64)
        for ours, generic in zip(sde.coefficients(t), SDE.coefficients(sde, t)):
            np.testing.assert_allclose(ours, generic, rtol=1e-9, atol=1e-12)
        lam = sde.log_snr(t)
        assert np.all(np.diff(np.asarray(lam)) < 0)
        np.testing.assert_allclose(sde.t_from_log_snr(lam), t, rtol=1e-9)
        np.testing.assert_allclose(SDE.t_from_log_snr(sde, lam), t, rtol=1e-9)
        alpha, sigma = sde.marginal_coeffs(t)
        np.testing.assert_allclose(lam, np.log(alpha**2 / sigma**2), rtol=1e-9, atol=1e-12)


def test_cosine_schedule_is_improved_ddpm():
    """ᾱ(t) = cos²(θ)/cos²(θ₀), θ = (t + s)/(1 + s)·π/2, and g² = β(t) = π tan θ/(1 + s) (VP: α² + σ² = 1)."""
    with jax.enable_x64(True):
        sde, t = CosineVPSDE(), jnp.array([0.0, 0.3, 0.9, 0.9946])
        theta = (np.asarray(t) + 0.008) / 1.008 * np.pi / 2
        alpha, sigma = sde.marginal_coeffs(t)
        np.testing.assert_allclose(alpha**2, np.cos(theta) ** 2 / np.cos(0.008 / 1.008 * np.pi / 2) ** 2, rtol=1e-12)
        np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, rtol=1e-12)
        f, g = sde.coefficients(t)
        np.testing.assert_allclose(g**2, np.pi * np.tan(theta) / 1.008, rtol=1e-9)
        np.testing.assert_allclose(f, -0.5 * g**2, rtol=1e-9)
    assert sde.T == 0.9946 and sde.prior_std == 1.0
    with pytest.raises(ValueError, match="t_max"):
        CosineVPSDE(t_max=1.0)


def test_edm_schedule():
    """α = 1, σ(t) = t on [σ_min, σ_max]; g² = dσ²/dt = 2t; the prior is N(0, σ_max²)."""
    sde = EDMSDE(sigma_min=0.002, sigma_max=80.0)
    t = jnp.array([0.002, 1.0, 80.0])
    alpha, sigma = sde.marginal_coeffs(t)
    np.testing.assert_array_equal(alpha, 1.0)
    np.testing.assert_array_equal(sigma, t)
    np.testing.assert_allclose(sde.coefficients(t)[1] ** 2, 2 * t, rtol=1e-6)
    assert (sde.T, sde.t_min, sde.sampling_eps, sde.prior_std) == (80.0, 0.002, 0.002, 80.0)
    assert isinstance(get_sde("EDMSDE", sigma_max=10.0), EDMSDE)


def test_beta_tables_match_their_definitions():
    """linear = DDPM's table (and VPSDE's chain); scaled_linear = linspace of square roots, squared;
    squaredcos_cap_v2 = 1 − ᾱ((i+1)/N)/ᾱ(i/N) clipped at 0.999, with the last entry clipped."""
    np.testing.assert_allclose(beta_table("linear", 1000), VPSDE().discrete_betas, rtol=1e-15)
    sl = beta_table("scaled_linear", 1000, beta_start=0.00085, beta_end=0.012)
    np.testing.assert_allclose(np.sqrt(sl)[[0, -1]], [0.00085**0.5, 0.012**0.5], rtol=1e-15)
    np.testing.assert_allclose(np.diff(np.sqrt(sl), 2), 0.0, atol=1e-15)
    cos = beta_table("squaredcos_cap_v2", 1000)
    f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
    np.testing.assert_allclose(cos[0], 1 - f(1e-3) / f(0.0), rtol=1e-12)
    assert cos[-1] == 0.999
    with pytest.raises(ValueError, match="valid"):
        beta_table("quadratic")


def test_discrete_schedule_is_exact_at_knots_and_monotone_between():
    """At knot t_i = i/(N−1): α² = ᾱ_i of the table (float64 rounding); between knots λ is linear;
    its chain (`discretize`) reproduces ᾱ_i; a linear-β table equals VPSDE's own chain."""
    sde = DiscreteVPSDE.from_beta_schedule("squaredcos_cap_v2", 50)
    abar = np.cumprod(1 - beta_table("squaredcos_cap_v2", 50))
    with jax.enable_x64(True):
        knots = jnp.linspace(0.0, 1.0, 50, dtype=jnp.float64)
        alpha, sigma = sde.marginal_coeffs(knots)
        np.testing.assert_allclose(alpha**2, abar, rtol=1e-12)
        np.testing.assert_allclose(sigma**2, 1 - abar, rtol=1e-12)
        mid = 0.5 * (knots[:-1] + knots[1:])
        np.testing.assert_allclose(sde.log_snr(mid), 0.5 * (sde.log_snr(knots[:-1]) + sde.log_snr(knots[1:])), rtol=1e-12)
    grid = (np.arange(sde.N) + 0.5) / (sde.N - 1)
    grid[-1] = 1.0
    coefs, variances = _chain_moments(sde, grid)
    np.testing.assert_allclose(coefs, np.sqrt(abar), rtol=1e-10)
    np.testing.assert_allclose(variances, 1 - abar, rtol=1e-10)
    np.testing.assert_allclose(DiscreteVPSDE.from_beta_schedule("linear").alphas_cumprod, VPSDE().alphas_cumprod,
                               rtol=1e-15)
    with pytest.raises(ValueError, match="decreasing"):
        DiscreteVPSDE((0.5, 0.9))
