"""Time grids (`sdejax.sampling.grids`): every builder against its defining formula on every schedule,
diffusers' integer timesteps written out by hand, and the validator's messages.

Grids are float64. ε = 2.2e-16. Where a grid is built through t(λ), the round trip σ̃ → λ → t → σ̃
costs a few ε times the conditioning of t(λ): ≤ 15 ε measured on VE/VP/sub-VP/EDM/discrete, so the
tolerance there is 1e-13 (≈ 450 ε). The cosine schedule evaluates σ² = 1 − cos²θ/cos²θ₀ with
cancellation near t = 0 (7e-12 relative at t = eps = 1e-3, measured against 40-digit arithmetic),
so its tolerance is 1e-10.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdejax.discrete import DiscreteVPSDE
from sdejax.sampling import grids
from sdejax.sde import EDMSDE, CosineVPSDE, VESDE, VPSDE, subVPSDE

EPS = np.finfo(np.float64).eps

# (sde, relative round-trip tolerance through t(λ)), see the module docstring.
SCHEDULES = [
    (VESDE(), 1e-13), (VPSDE(), 1e-13), (subVPSDE(), 1e-13), (EDMSDE(), 1e-13),
    (DiscreteVPSDE.from_beta_schedule("linear"), 1e-13), (CosineVPSDE(), 1e-10),
]
SDES = [sde for sde, _ in SCHEDULES]
IDS = [type(sde).__name__ for sde in SDES]


def sigma_tilde(sde, t):
    """σ̃(t) = σ_t/α_t in float64, from marginal_coeffs."""
    with jax.enable_x64(True):
        alpha, sigma = sde.marginal_coeffs(jnp.asarray(t, jnp.float64))
        return np.asarray(sigma / alpha)


def log_snr(sde, t):
    with jax.enable_x64(True):
        return np.asarray(sde.log_snr(jnp.asarray(t, jnp.float64)))


def karras_sigmas(s_max, s_min, n, rho):
    """EDM's formula, written out: σ_i = (σ_max^{1/ρ} + i/(n−1)(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ."""
    i = np.arange(n)
    return (s_max ** (1 / rho) + i / (n - 1) * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho


# --- every builder on every schedule -------------------------------------------------------------

@pytest.mark.parametrize("sde", SDES, ids=IDS)
@pytest.mark.parametrize("name", ["uniform", "karras", "log_snr", "quadratic"])
def test_every_grid_runs_from_T_to_eps_on_every_schedule(sde, name):
    ts = grids.get_grid(name, sde, 12)
    assert ts.dtype == np.float64 and ts.shape == (12,)
    assert ts[0] == sde.T and ts[-1] == sde.sampling_eps
    assert np.all(np.diff(ts) < 0)
    assert np.all(np.isfinite(log_snr(sde, ts)))


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_ddpm_grid_runs_on_every_schedule(sde):
    ts = grids.get_grid("ddpm", sde, 10, spacing="trailing")
    np.testing.assert_array_equal(ts, np.linspace(0.0, sde.T, sde.N)[np.arange(999, 0, -100)])


def test_one_point_grid_is_t_max():
    for name in ["uniform", "karras", "log_snr", "quadratic"]:
        np.testing.assert_array_equal(grids.get_grid(name, VPSDE(), 1), [1.0])


# --- uniform -------------------------------------------------------------------------------------

@pytest.mark.parametrize("sde", [VESDE(), VPSDE(N=1000), subVPSDE(N=250)], ids=["VE", "VP", "subVP"])
def test_uniform_is_todays_pc_grid(sde):
    """Equal to jnp.linspace(T, eps, N): T(1 − s) + eps·s with ≤ 4 roundings of terms ≤ T, so the
    float64 grid (built eagerly) differs from jnp's by ≤ 4·2⁻⁵³·T, and float32 jnp by ≤ 4·2⁻²⁴·T."""
    eps = sde.sampling_eps
    ts = grids.uniform(sde, sde.N)
    with jax.enable_x64(True):
        assert np.max(np.abs(ts - np.asarray(jnp.linspace(sde.T, eps, sde.N)))) <= 4 * 2.0**-53 * sde.T
    f32 = np.asarray(jnp.linspace(sde.T, eps, sde.N), np.float64)
    assert np.max(np.abs(ts - f32)) <= 4 * 2.0**-24 * sde.T


def test_uniform_t_max_and_eps():
    np.testing.assert_allclose(grids.uniform(VESDE(), 5, eps=0.0, t_max=0.5), [0.5, 0.375, 0.25, 0.125, 0.0],
                               rtol=0, atol=EPS)


# --- karras --------------------------------------------------------------------------------------

@pytest.mark.parametrize("sde,rtol", SCHEDULES, ids=IDS)
@pytest.mark.parametrize("n", [2, 18, 101])
def test_karras_is_edm_formula_in_sigma_tilde(sde, rtol, n):
    """Endpoints exactly σ̃(T), σ̃(eps); σ̃(t_i) equals the formula to the round-trip tolerance."""
    ts = grids.karras(sde, n)
    s_max, s_min = sigma_tilde(sde, np.array([sde.T, sde.sampling_eps]))
    got = sigma_tilde(sde, ts)
    assert got[0] == s_max and got[-1] == s_min
    np.testing.assert_allclose(got, karras_sigmas(s_max, s_min, n, 7.0), rtol=rtol)


@pytest.mark.parametrize("sde,rtol", SCHEDULES, ids=IDS)
def test_karras_rho_one_is_linear_in_sigma_tilde(sde, rtol):
    got = sigma_tilde(sde, grids.karras(sde, 33, rho=1.0))
    assert np.max(np.abs(np.diff(got, 2))) <= rtol * got[0]


@pytest.mark.parametrize("sde", [VESDE(), VPSDE()], ids=["VE", "VP"])
def test_karras_large_rho_tends_to_log_uniform(sde):
    """With L = log σ̃, x = (1−u)L_max/ρ + uL_min/ρ: log σ̃_i − [(1−u)L_max + uL_min] = ρ(log E e^X − E X)
    for X ∈ {L_max/ρ, L_min/ρ} w.p. (1−u, u), which lies in [0, ΔL²/(8ρ)] (Jensen, Hoeffding's lemma)
    and is ρ log cosh(ΔL/(2ρ)) at u = ½. In float64 (·)^ρ costs ρε ≈ 2e-13 relative; we allow 1e-11."""
    rho, n = 1000.0, 11
    s = sigma_tilde(sde, grids.karras(sde, n, rho=rho))
    dev = np.log(s) - np.linspace(np.log(s[0]), np.log(s[-1]), n)
    dL = np.log(s[0] / s[-1])
    assert np.all(dev >= -1e-11) and np.all(dev <= dL**2 / (8 * rho) + 1e-11)
    np.testing.assert_allclose(dev[n // 2], rho * np.log(np.cosh(dL / (2 * rho))), rtol=1e-8)
    assert dev[n // 2] > 0.99 * dL**2 / (8 * rho)  # the bound is attained: the limit is log-uniform at rate 1/ρ


def test_karras_edm_defaults_are_clamped_to_the_ve_range():
    """EDM's σ ∈ [0.002, 80] on VESDE(σ_max = 50): clipped to [σ̃(eps), σ̃(T)], the default grid."""
    sde = VESDE(sigma_max=50.0)
    ts = grids.karras(sde, 18, sigma_min=0.002, sigma_max=80.0)
    np.testing.assert_array_equal(ts, grids.karras(sde, 18))
    assert ts[0] == sde.T and sigma_tilde(sde, ts[0]) <= 50.0 * (1 + EPS)


def test_karras_inner_sigma_endpoints():
    sde = VESDE()
    ts = grids.karras(sde, 10, sigma_min=0.1, sigma_max=20.0)
    np.testing.assert_allclose(sigma_tilde(sde, ts)[[0, -1]], [20.0, 0.1], rtol=1e-13)
    assert sde.sampling_eps < ts[-1] < ts[0] < sde.T


@pytest.mark.parametrize("kwargs,match", [
    ({"rho": 0.0}, "rho must be a positive"),
    ({"rho": float("nan")}, "rho must be a positive"),
    ({"sigma_min": -1.0}, "sigma_min must be a positive"),
    ({"sigma_max": float("inf")}, "sigma_max must be a positive"),
    ({"sigma_min": 60.0}, r"sigma_min must be below sigma_max after clamping.*\[0.01"),
    ({"sigma_min": 5.0, "sigma_max": 2.0}, "sigma_min must be below sigma_max"),
])
def test_karras_rejects_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        grids.karras(VESDE(), 10, **kwargs)


# --- log_snr, quadratic --------------------------------------------------------------------------

@pytest.mark.parametrize("sde,rtol", SCHEDULES, ids=IDS)
def test_log_snr_grid_has_constant_lambda_spacing(sde, rtol):
    lam = log_snr(sde, grids.log_snr(sde, 41))
    steps = np.diff(lam)
    assert np.max(np.abs(steps - steps.mean())) <= rtol * np.max(np.abs(lam))
    np.testing.assert_allclose(lam[[0, -1]], log_snr(sde, np.array([sde.T, sde.sampling_eps])), rtol=0, atol=0)


def test_log_snr_grid_on_ve_is_uniform():
    """VE: λ = −2 log σ_min − 2t log(σ_max/σ_min) is affine in t, so uniform in λ is uniform in t."""
    np.testing.assert_allclose(grids.log_snr(VESDE(), 50), grids.uniform(VESDE(), 50), rtol=0, atol=1e-14)


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_quadratic_is_linear_in_sqrt_t(sde):
    """√t_i = linspace(√T, √eps, n) up to squaring and sqrt (1.5 ε relative) and linspace (ε √T)."""
    root = np.sqrt(grids.quadratic(sde, 25))
    assert np.max(np.abs(np.diff(root, 2))) <= 8 * EPS * np.sqrt(sde.T)


# --- DDPM integer timesteps ----------------------------------------------------------------------

def test_ddpm_timesteps_are_diffusers_values():
    """(1000 train steps, 10 steps), from diffusers' definitions by hand:
    leading: arange(10)·(1000 // 10) reversed; trailing: round(arange(1000, 0, −100)) − 1;
    linspace: round(linspace(0, 999, 10)) = 111·k reversed."""
    np.testing.assert_array_equal(grids.ddpm_timesteps(1000, 10, "leading"),
                                  [900, 800, 700, 600, 500, 400, 300, 200, 100, 0])
    np.testing.assert_array_equal(grids.ddpm_timesteps(1000, 10, "leading", steps_offset=1),
                                  [901, 801, 701, 601, 501, 401, 301, 201, 101, 1])
    np.testing.assert_array_equal(grids.ddpm_timesteps(1000, 10, "trailing"),
                                  [999, 899, 799, 699, 599, 499, 399, 299, 199, 99])
    np.testing.assert_array_equal(grids.ddpm_timesteps(1000, 10, "linspace"),
                                  [999, 888, 777, 666, 555, 444, 333, 222, 111, 0])
    assert grids.ddpm_timesteps(1000, 10).dtype == np.int64


def test_ddpm_trailing_uneven_counts():
    """13 steps: round(1000 − 1000k/13) − 1 (as listed in diffusers issue #9261). 61 steps: numpy's
    arange(1000, 0, −1000/61) holds 62 entries, the last ≈ −6e-13 (timestep −1); the grid keeps 61,
    ending at round(1000/61) − 1 = 15."""
    np.testing.assert_array_equal(grids.ddpm_timesteps(1000, 13, "trailing"),
                                  [999, 922, 845, 768, 691, 614, 537, 461, 384, 307, 230, 153, 76])
    steps = grids.ddpm_timesteps(1000, 61, "trailing")
    assert steps.shape == (61,) and steps[0] == 999 and steps[-1] == 15 and np.all(np.diff(steps) < 0)


@pytest.mark.parametrize("args,kwargs,match", [
    ((1000, 10, "uniform"), {}, r"unknown spacing 'uniform'; valid spacings: \['leading', 'trailing', 'linspace'\]"),
    ((1000, 1001), {}, "num_steps must be <= num_train_timesteps = 1000"),
    ((1000, 0), {}, "num_steps must be an integer >= 1"),
    ((1000, 10, "trailing"), {"steps_offset": 1}, "steps_offset applies to spacing='leading' only"),
    ((10, 10, "leading"), {"steps_offset": 1}, "moves the first timestep to 10"),
    ((1000, 10), {"steps_offset": -1}, "steps_offset must be an integer >= 0"),
])
def test_ddpm_timesteps_reject_bad_input(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        grids.ddpm_timesteps(*args, **kwargs)


def test_ddpm_grid_maps_timesteps_to_knots():
    sde = VESDE()
    np.testing.assert_allclose(grids.ddpm_grid(sde, 10, "trailing"), np.arange(999, 0, -100) / 999,
                               rtol=2 * EPS)
    with pytest.raises(ValueError, match=r"ts\[9\] = 0.0 has an infinite log-SNR"):
        grids.ddpm_grid(VPSDE(), 10, "leading")  # timestep 0 is t = 0, where σ = 0
    np.testing.assert_allclose(grids.ddpm_grid(VPSDE(), 10, "leading", steps_offset=1),
                               np.arange(901, 0, -100) / 999, rtol=2 * EPS)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_ddpm_grid_lands_on_the_discrete_table(spacing):
    """On DiscreteVPSDE, α(t)² at the grid is the table's ᾱ_i (interp, sigmoid, sqrt: ≤ 10 ε)."""
    sde = DiscreteVPSDE.from_beta_schedule("linear")
    with jax.enable_x64(True):
        alpha, _ = sde.marginal_coeffs(jnp.asarray(grids.ddpm_grid(sde, 10, spacing)))
    np.testing.assert_allclose(np.asarray(alpha) ** 2, sde.alphas_cumprod[grids.ddpm_timesteps(1000, 10, spacing)],
                               rtol=10 * EPS)


# --- validate ------------------------------------------------------------------------------------

@pytest.mark.parametrize("ts,match", [
    ([1.0, np.nan], r"ts must be finite; ts\[1\] = nan"),
    ([np.inf, 0.5], r"ts must be finite; ts\[0\] = inf"),
    ([1.0, 0.5, 0.5], r"strictly decreasing; ts\[1\] = 0.5 <= ts\[2\] = 0.5"),
    ([0.2, 0.5], r"strictly decreasing; ts\[0\] = 0.2 <= ts\[1\] = 0.5"),
    ([2.0, 0.5], r"ts\[0\] = 2.0 lies outside the SDE's time range \[t_min, T\] = \[0.0, 1.0\]"),
    ([0.5, -0.1], r"ts\[1\] = -0.1 lies outside"),
    ([[1.0, 0.5]], r"1-D array of times; got shape \(1, 2\)"),
    ([], "at least one entry"),
    ([1.0, 0.0], r"ts\[1\] = 0.0 has an infinite log-SNR .*sampling_eps = 0.001"),
    (["late", "early"], "numeric array of times"),
])
def test_validate_rejects_bad_grids(ts, match):
    with pytest.raises(ValueError, match=match):
        grids.validate(VPSDE(), ts)


def test_validate_domain_follows_the_sde():
    np.testing.assert_array_equal(grids.validate(VESDE(), [1.0, 0.0]), [1.0, 0.0])  # σ(0) = σ_min > 0
    with pytest.raises(ValueError, match=r"ts\[1\] = 0.001 lies outside .* \[0.002, 80.0\]"):
        grids.validate(EDMSDE(), [80.0, 0.001])


def test_validate_returns_float64():
    ts = grids.validate(VPSDE(), jnp.asarray([1.0, 0.5, 0.25], jnp.float32))
    assert isinstance(ts, np.ndarray) and ts.dtype == np.float64
    np.testing.assert_array_equal(ts, [1.0, 0.5, 0.25])


@pytest.mark.parametrize("kwargs,match", [
    ({"n": 0}, r"n \(number of grid points\) must be an integer >= 1; got 0"),
    ({"n": 2.5}, "must be an integer >= 1; got 2.5"),
    ({"n": 5, "eps": 1.0}, r"eps must lie in \[t_min, t_max\) = \[0.0, 1.0\); got 1.0"),
    ({"n": 5, "eps": -0.1}, "eps must lie in"),
    ({"n": 5, "t_max": 1.5}, r"t_max must lie in \(t_min, T\] = \(0.0, 1.0\]; got 1.5"),
    ({"n": 5, "eps": 0.0}, r"ts\[4\] = 0.0 has an infinite log-SNR"),
])
def test_builders_reject_bad_ends(kwargs, match):
    with pytest.raises(ValueError, match=match):
        grids.uniform(VPSDE(), **kwargs)


# --- get_grid ------------------------------------------------------------------------------------

def test_get_grid_by_name_builder_or_array():
    sde = VPSDE()
    assert set(grids.GRIDS) == {"uniform", "karras", "log_snr", "quadratic", "ddpm"}
    np.testing.assert_array_equal(grids.get_grid("karras", sde, 7, rho=3.0), grids.karras(sde, 7, rho=3.0))
    np.testing.assert_array_equal(grids.get_grid(grids.quadratic, sde, 7), grids.quadratic(sde, 7))
    np.testing.assert_array_equal(grids.get_grid([1.0, 0.5], sde), [1.0, 0.5])
    np.testing.assert_array_equal(grids.get_grid(np.array([1.0, 0.5]), sde, 2), [1.0, 0.5])


@pytest.mark.parametrize("args,kwargs,match", [
    (("euler", 10), {}, r"unknown grid 'euler'; valid names: \['ddpm', 'karras', 'log_snr', 'quadratic', 'uniform'\]"),
    (("karras", 10), {"sigma": 1.0}, r"unknown option\(s\) \['sigma'\] for grid 'karras'; valid options: "
                                     r"\['rho', 'sigma_min', 'sigma_max', 'eps'\]"),
    (("karras",), {}, "grid 'karras' needs n"),
    (([1.0, 0.5], 3), {}, "n = 3 does not match the array grid's length 2"),
    (([1.0, 0.5],), {"rho": 7.0}, r"an array grid takes no options; got \['rho'\]"),
    ((lambda sde, n: np.linspace(0.0, 1.0, n), 4), {}, "strictly decreasing"),
])
def test_get_grid_rejects_bad_input(args, kwargs, match):
    grid, *rest = args
    with pytest.raises(ValueError, match=match):
        grids.get_grid(grid, VPSDE(), *rest, **kwargs)
