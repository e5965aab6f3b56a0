"""Cascaded super-resolution oracles on Gaussian images (4×4×1 high resolution, f = 2: z = Dx is 2×2).

x ~ N(μ, Σ) (correlated Σ on the 16 pixels), z = D x (D the area-average matrix), z_s = a z + b ε with
(a, b) = the augmentation schedule's (α_s, σ_s). (x, z_s) is jointly Gaussian, so

    m = μ + G (z_s − a D μ),  G = a Σ Dᵀ K⁻¹,  K = a² D Σ Dᵀ + b² I,  C = Σ − G a D Σ,

and x_t | z_s ~ N(α_t m, α_t² C + σ_t² I) under any linear SDE: the exact conditional score is closed
form. `oracle_apply` computes it from the SR network input [x_t, up(z_s), s·1] by a second route (the
joint precision of (x_t, z_s), a 4×4 Schur complement solved by Gauss–Jordan: no batched LAPACK calls,
which are slow here, ≈ 5 µs per 16×16 solve, and may deadlock XLA:CPU on 2 cores, see gaussian_oracle), and runs through `sr_apply_fn` and
`get_score_fn` like any network.

Sampling tolerance. With an affine score, DDIM (η = 0, Tweedie denoising at the end) is an affine map
x = M x_T + N z_s + c, so the exact law of the discretised sampler is read off probe rows in the same
batch (x_T = 0, unit vectors; z_s + unit vectors). Its error against the target (discretisation,
the N(0, I) prior instead of p_T, the final denoising) is the bias b, asserted to be below one
Monte-Carlo standard error entrywise (the grid is fine enough), and the n random rows must match the
target within 5 SE + |b| entrywise (SE of a mean: sqrt(C_ii/n); of a covariance entry:
sqrt((C_ii C_jj + C_ij²)/n)).
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

from gaussian_oracle import gaussian_score, sample_moments
from sdejax import losses
from sdejax.models.ddpm import DDPM
from sdejax.models.registry import make_apply_fn
from sdejax.precond import Precond
from sdejax.sampling.ddim import ddim_sample
from sdejax.score import get_score_fn
from sdejax.sde import VESDE, VPSDE
from sdejax.superres import (
    SRParams, SRStage, augment, cascade_sample, downsample, sr_apply_fn, sr_input, sr_loss_fn, sr_score_builder,
    upsample,
)

H, F = 4, 2
HL = H // F
DIM, DIM_LOW = H * H, HL * HL
SDE_ = VPSDE(beta_min=0.1, beta_max=20.0)
AUG = VPSDE(beta_min=0.1, beta_max=20.0)
PRECOND = Precond.plain("score", "time")  # the oracle outputs the score; labels 999 t
EPS, STEPS, N_MC = 1e-3, 300, 2000
GRID = np.linspace(SDE_.T, EPS, STEPS)
LEVELS = (0.0, 0.2)


def _gaussian():
    rs = np.random.RandomState(0)
    q, _ = np.linalg.qr(rs.randn(DIM, DIM))
    return rs.uniform(-0.5, 0.5, DIM), q @ np.diag(np.linspace(0.3, 2.0, DIM)) @ q.T


MU, SIG = _gaussian()


def _pixel_matrix(weight):
    """The (h·w_low) × (H·W) matrix with entry weight(I, J, i, j) for low pixel (I, J), high pixel (i, j)."""
    return np.array([[weight(p // HL, p % HL, q // H, q % H) for q in range(DIM)] for p in range(DIM_LOW)])


D = _pixel_matrix(lambda I, J, i, j: float(i // F == I and j // F == J) / F**2)   # area average
U_NEAREST = _pixel_matrix(lambda I, J, i, j: float(i // F == I and j // F == J)).T


def _bilinear_1d(n_low: int, f: int) -> np.ndarray:
    """Interpolation weights (n_low·f, n_low) at source u = (i + ½)/f − ½ clamped to [0, n_low − 1]."""
    w = np.zeros((n_low * f, n_low))
    for i in range(n_low * f):
        u = min(max((i + 0.5) / f - 0.5, 0.0), n_low - 1.0)
        lo = int(np.floor(u))
        hi = min(lo + 1, n_low - 1)
        w[i, lo] += 1.0 - (u - lo)
        w[i, hi] += u - lo
    return w


U_BILINEAR = np.kron(_bilinear_1d(HL, F), _bilinear_1d(HL, F))  # row-major pixels: (i, j) -> i·H + j
UPS = {"nearest": U_NEAREST, "bilinear": U_BILINEAR}


def aug_coeffs(level: float) -> tuple[float, float]:
    a, b = AUG.marginal_coeffs(jnp.asarray([level], jnp.float32))
    return float(a[0]), float(b[0])


def conditional(a: float, b: float, z_s: np.ndarray):
    """(m, C, G) of x | z_s (module docstring), float64."""
    k = a**2 * D @ SIG @ D.T + b**2 * np.eye(DIM_LOW)
    g = a * SIG @ D.T @ np.linalg.inv(k)
    return MU + g @ (z_s - a * D @ MU), SIG - g @ (a * D @ SIG), g


# --- the exact conditional score as an SR "network" -------------------------------------------
def _gauss_jordan(m, v):
    """Solve m x = v for a batch of small SPD matrices m (B, k, k) without pivoting."""
    aug = jnp.concatenate([m, v[..., None]], axis=-1)
    for i in range(m.shape[-1]):
        row = aug[:, i] / aug[:, i, i][:, None]
        aug = (aug - aug[:, :, i][:, :, None] * row[:, None, :]).at[:, i].set(row)
    return aug[:, :, -1]


def oracle_apply(sde, p, inp, labels, *, train=False, rng=None, y=None, w=None):
    """∇ log p(x_t | z_s) from inp = [x_t, up(z_s), s·1], labels 999 t. With A = α²Σ + σ²I = U diag(α²λ + σ²) Uᵀ,
    W = α a Σ Dᵀ and the Schur complement S = K − Wᵀ A⁻¹ W = a² Eᵀ diag(λσ²/(α²λ + σ²)) E + b² I (E = Uᵀ Dᵀ):
    score = −[A⁻¹ r_x + A⁻¹ W S⁻¹ (Wᵀ A⁻¹ r_x − r_z)], r_x = x_t − α μ, r_z = z_s − a D μ."""
    b = inp.shape[0]
    xt = inp[..., 0].reshape(b, -1)
    z = inp[..., 1].reshape(b, -1) @ p["pinv_up"].T
    al, sg = (v[:, None] for v in sde.marginal_coeffs(labels * sde.T / 999.0))
    a, bb = AUG.marginal_coeffs(jnp.mean(inp[..., 2].reshape(b, -1), axis=-1))
    lam, e = p["lam"], p["e"]
    rho = (xt - al * p["mu"]) @ p["u"]
    den = al**2 * lam + sg**2
    schur = (a[:, None, None] ** 2 * jnp.einsum("ji,bj,jl->bil", e, lam * sg**2 / den, e)
             + bb[:, None, None] ** 2 * jnp.eye(DIM_LOW, dtype=inp.dtype))
    q = al * a[:, None] * ((lam / den * rho) @ e) - (z - a[:, None] * p["dmu"])
    inner = rho / den + al * a[:, None] * lam / den * (_gauss_jordan(schur, q) @ e.T)
    return -(inner @ p["u"].T).reshape(inp.shape[:3] + (1,))


def oracle_params(method: str, dtype=jnp.float32) -> dict:
    lam, u = np.linalg.eigh(SIG)
    tree = dict(lam=lam, u=u, e=u.T @ D.T, mu=MU, dmu=D @ MU, pinv_up=np.linalg.pinv(UPS[method]))
    return {k: jnp.asarray(v, dtype) for k, v in tree.items()}


VE = VESDE(sigma_min=0.01, sigma_max=20.0)
APPLY = {(name, method): sr_apply_fn(functools.partial(oracle_apply, sde), method)
         for name, sde in (("vp", SDE_), ("ve", VE)) for method in UPS}


def images(v: np.ndarray, side: int, dtype=jnp.float32) -> jax.Array:
    return jnp.asarray(np.reshape(v, (-1, side, side, 1)), dtype)


# --- (d) down/upsampling ----------------------------------------------------------------------
def test_downsample_and_upsample_match_their_matrices():
    x = np.random.RandomState(1).randn(3, H, H, 1)
    np.testing.assert_allclose(np.asarray(downsample(images(x, H), F)).reshape(3, -1),
                               x.reshape(3, -1) @ D.T, rtol=1e-6, atol=1e-6)
    z = np.random.RandomState(2).randn(3, HL, HL, 1)
    for method, u in UPS.items():
        got = np.asarray(upsample(images(z, HL), F, method)).reshape(3, -1)
        np.testing.assert_allclose(got, z.reshape(3, -1) @ u.T, rtol=1e-6, atol=1e-6, err_msg=method)
    assert np.linalg.matrix_rank(U_BILINEAR) == DIM_LOW
    # shapes, channels and the mean: area averaging preserves it; D·up_nearest = I; constants stay constant
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 8, 3))
    low = downsample(x, 2)
    assert low.shape == (2, 3, 4, 3)
    np.testing.assert_allclose(np.asarray(low.mean(axis=(1, 2))), np.asarray(x.mean(axis=(1, 2))), atol=1e-6)
    np.testing.assert_allclose(np.asarray(downsample(upsample(low, 2), 2)), np.asarray(low), rtol=1e-6)
    assert upsample(low, 3, "bilinear").shape == (2, 9, 12, 3)
    np.testing.assert_allclose(np.asarray(upsample(jnp.full((1, 3, 4, 2), 0.7), 2, "bilinear")), 0.7, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(downsample(x, 1)), np.asarray(x))


def test_bad_inputs_raise_naming_the_argument():
    x, z = jnp.zeros((2, 4, 4, 1)), jnp.zeros((2, 2, 2, 1))
    level = jnp.zeros((2,))
    cases = [
        (lambda: downsample(jnp.zeros((2, 5, 4, 1)), 2), "divisible by factor"),
        (lambda: downsample(x, 0), "factor"),
        (lambda: downsample(jnp.zeros((4, 4)), 2), "x must be NHWC"),
        (lambda: upsample(z, 2, "cubic"), "valid: ['nearest', 'bilinear']"),
        (lambda: sr_apply_fn(lambda *a, **k: a[1], "cubic"), "valid: ['nearest', 'bilinear']"),
        (lambda: sr_input(x, jnp.zeros((2, 3, 3, 1)), level), "low_res"),
        (lambda: sr_input(x, jnp.zeros((2, 2, 1, 1)), level), "low_res"),
        (lambda: sr_input(x, jnp.zeros((3, 2, 2, 1)), level), "low_res"),
        (lambda: sr_input(x, z, jnp.zeros((3,))), "aug_level"),
        (lambda: augment(z, level, jnp.zeros((2, 2, 2, 2)), AUG), "noise"),
        (lambda: sr_apply_fn(lambda p, h, l, **k: h[:, :2])(SRParams({}, z, level), x, level), "inner network"),
        (lambda: sr_loss_fn(lambda *a: None, AUG, 1.5), "s_max"),
        (lambda: sr_loss_fn(lambda *a: None, AUG, 0.5)({}, jax.random.PRNGKey(0), {"x": x}), "low_res"),
        (lambda: sr_loss_fn(lambda *a: None, AUG, 0.5, functools.partial(downsample, factor=2))(
            {}, jax.random.PRNGKey(0), {"x": x, "low_res": z}), "pass one"),
        (lambda: cascade_sample(jax.random.PRNGKey(0), lambda k: (z, 1),
                                [SRStage(None, None, AUG, -0.1)]), "stages[0].aug_level"),
    ]
    for fn, needle in cases:
        with pytest.raises(ValueError) as err:
            fn()
        assert needle in str(err.value), (needle, str(err.value))


# --- (a) the exact conditional score through the SR wrapper -----------------------------------
@pytest.mark.parametrize("sde_name, method", [("vp", "nearest"), ("ve", "bilinear")])
def test_wrapped_oracle_is_the_closed_form_conditional_score(sde_name, method):
    sde = {"vp": SDE_, "ve": VE}[sde_name]
    rs = np.random.RandomState(3)
    n = 6
    t = np.array([1e-3, 0.01, 0.1, 0.3, 0.7, 1.0])
    level = np.array([0.0, 0.05, 0.2, 0.5, 0.0, 1.0])
    x = rs.randn(n, DIM) * 2
    z_s = rs.randn(n, DIM_LOW)
    with jax.enable_x64(True):
        alpha, sigma = (np.asarray(v) for v in sde.marginal_coeffs(jnp.asarray(t)))
        ab = [tuple(float(v[0]) for v in AUG.marginal_coeffs(jnp.asarray([s]))) for s in level]
        want = []
        for i, (a, b) in enumerate(ab):  # x_t | z_s ~ N(α m, α² C + σ² I)
            m, c, _ = conditional(a, b, z_s[i])
            want.append(-np.linalg.solve(alpha[i] ** 2 * c + sigma[i] ** 2 * np.eye(DIM), x[i] - alpha[i] * m))
        want = np.stack(want)
        params = SRParams(oracle_params(method, jnp.float64), images(z_s, HL, jnp.float64), jnp.asarray(level))
        score = get_score_fn(sde, APPLY[(sde_name, method)], params, precond=PRECOND)
        got = np.asarray(jax.jit(lambda f, x, t: f(x, t))(score, images(x, H, jnp.float64), jnp.asarray(t)))
        np.testing.assert_allclose(got.reshape(n, -1), want, rtol=1e-8, atol=1e-9 * np.abs(want).max())


# --- (b) sampling the conditional ---------------------------------------------------------------
@jax.jit
def _ddim(score, x_T):
    return ddim_sample(jax.random.PRNGKey(0), SDE_, score, x_T.shape, ts=GRID, x_T=x_T)[0]


def _sr_probe_rows(z0: np.ndarray):
    """(z_s rows, x_T rows) of the probes: (z0, 0), (z0 + e_j, 0) j < 4, (z0, e_i) i < 16."""
    zs = np.tile(z0, (1 + DIM_LOW + DIM, 1))
    zs[1:1 + DIM_LOW] += np.eye(DIM_LOW)
    xt = np.concatenate([np.zeros((1 + DIM_LOW, DIM)), np.eye(DIM)])
    return zs, xt


@pytest.fixture(scope="module")
def sr_runs():
    """Per level: a fixed z_s, n conditional samples given it and the sampler's affine map (M, N, c)."""
    rs = np.random.RandomState(4)
    runs = {}
    for level in LEVELS:
        a, b = aug_coeffs(level)
        z0 = a * D @ (MU + np.linalg.cholesky(SIG) @ rs.randn(DIM)) + b * rs.randn(DIM_LOW)
        zp, xp = _sr_probe_rows(z0)
        zs, x_T = np.concatenate([np.tile(z0, (N_MC, 1)), zp]), np.concatenate([rs.randn(N_MC, DIM), xp])
        params = SRParams(oracle_params("bilinear"), images(zs, HL), jnp.full((zs.shape[0],), level))
        score = get_score_fn(SDE_, APPLY[("vp", "bilinear")], params, precond=PRECOND)
        out = np.asarray(_ddim(score, images(x_T, H)), np.float64).reshape(zs.shape[0], DIM)
        probes = out[N_MC:]
        n_map = (probes[1:1 + DIM_LOW] - probes[0]).T
        m_map = (probes[1 + DIM_LOW:] - probes[0]).T
        runs[level] = dict(z0=z0, x=out[:N_MC], M=m_map, N=n_map, c=probes[0] - n_map @ z0)
    return runs


def check_moments(x: np.ndarray, law_mean, law_cov, mean, cov, label: str) -> dict:
    """|law − target| ≤ 1 SE and |sample moment − target| ≤ 5 SE + |law − target|, entrywise."""
    n = x.shape[0]
    se_m = np.sqrt(np.diag(cov) / n)
    se_c = np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov**2) / n)
    got_m, got_c, _, _ = sample_moments(x)
    bias_m, bias_c = np.abs(law_mean - mean), np.abs(law_cov - cov)
    assert np.all(bias_m <= se_m) and np.all(bias_c <= se_c), (label, (bias_m / se_m).max(), (bias_c / se_c).max())
    err_m, err_c = np.abs(got_m - mean), np.abs(got_c - cov)
    assert np.all(err_m <= 5 * se_m + bias_m), (label, "mean", ((err_m - bias_m) / se_m).max())
    assert np.all(err_c <= 5 * se_c + bias_c), (label, "cov", ((err_c - bias_c) / se_c).max())
    stats = dict(bias_mean=bias_m.max(), bias_cov=bias_c.max(), bias_mean_se=(bias_m / se_m).max(),
                 bias_cov_se=(bias_c / se_c).max(), mc_mean_se=((err_m - bias_m) / se_m).max(),
                 mc_cov_se=((err_c - bias_c) / se_c).max())
    print(label, {k: f"{v:.4f}" for k, v in stats.items()})
    return stats


@pytest.mark.parametrize("level", LEVELS)
def test_ddim_with_the_exact_conditional_score_samples_x_given_z(sr_runs, level):
    run = sr_runs[level]
    a, b = aug_coeffs(level)
    m, c, _ = conditional(a, b, run["z0"])
    check_moments(run["x"], run["N"] @ run["z0"] + run["c"], run["M"] @ run["M"].T, m, c, f"SR level {level}")
    if level == 0.0:  # unaugmented: C Dᵀ = 0 and D m = z, so every denoised sample has D x = z exactly
        np.testing.assert_allclose(run["x"] @ D.T, np.tile(run["z0"], (N_MC, 1)), atol=2e-4)


# --- (c) the cascade --------------------------------------------------------------------------
def _image_score(flat, x, t):
    return flat(x.reshape(x.shape[0], -1), t).reshape(x.shape)


BASE_SCORE = Partial(_image_score, gaussian_score(SDE_, D @ MU, D @ SIG @ D.T))  # exact score of z = Dx


def _cascade(level: float, x_T: np.ndarray):
    """cascade_sample with jitted stage samplers: `_ddim` on the base score with the caller's x_T (probe rows
    included), then `_ddim` on the SR score (the program of `sr_runs`: same batch, same score pytree) from a
    prior draw of the stage's key."""
    n = x_T.shape[0]
    base = lambda rng: (_ddim(BASE_SCORE, images(x_T, HL)), STEPS)  # noqa: E731
    sample = lambda rng, score: (_ddim(score, SDE_.prior_sampling(rng, (n, H, H, 1))), STEPS)  # noqa: E731
    stage = SRStage(sr_score_builder(SDE_, APPLY[("vp", "bilinear")], oracle_params("bilinear"), precond=PRECOND),
                    sample, AUG, level)
    return cascade_sample(jax.random.PRNGKey(7), base, [stage])


@pytest.mark.parametrize("level", LEVELS)
def test_cascade_of_exact_scores_samples_the_full_gaussian(sr_runs, level):
    """x ~ N(μ, Σ) and z ~ N(Dμ, DΣDᵀ) at any augmentation level (the base samples z exactly, z_s then has
    its model law, and the SR stage samples x | z_s exactly), with Cov(x, z) = G a DΣDᵀ (x sees z only
    through z_s; = ΣDᵀ at level 0, where z = Dx). The discretised cascade's law: z = M_b x_T + c_b (base
    probe rows), x = M x_T' + N z_s + c (the SR map of `sr_runs`), z_s = a z + b ε."""
    rs = np.random.RandomState(5)
    probes = np.concatenate([np.zeros((1, DIM_LOW)), np.eye(DIM_LOW), np.zeros((DIM, DIM_LOW))])  # batch of sr_runs
    x_T = np.concatenate([rs.randn(N_MC, DIM_LOW), probes])
    (z, x), nfes = _cascade(level, x_T)
    assert nfes == [STEPS, STEPS] and z.shape == (x_T.shape[0], HL, HL, 1) and x.shape == (x_T.shape[0], H, H, 1)
    z, x = (np.asarray(v, np.float64).reshape(x_T.shape[0], -1) for v in (z, x))
    c_b = z[N_MC]
    m_b = (z[N_MC + 1:N_MC + 1 + DIM_LOW] - c_b).T
    run, (a, b) = sr_runs[level], aug_coeffs(level)
    cov_z = m_b @ m_b.T
    law_mean = np.concatenate([c_b, run["N"] @ (a * c_b) + run["c"]])
    cov_x = run["M"] @ run["M"].T + run["N"] @ (a**2 * cov_z + b**2 * np.eye(DIM_LOW)) @ run["N"].T
    cross = a * run["N"] @ cov_z
    law_cov = np.block([[cov_z, cross.T], [cross, cov_x]])
    mean = np.concatenate([D @ MU, MU])
    g = conditional(a, b, np.zeros(DIM_LOW))[2]
    cross_true = a * g @ D @ SIG @ D.T
    cov = np.block([[D @ SIG @ D.T, cross_true.T], [cross_true, SIG]])
    joint = np.concatenate([z[:N_MC], x[:N_MC]], axis=1)
    check_moments(joint, law_mean, law_cov, mean, cov, f"cascade level {level}")
    if level == 0.0:
        np.testing.assert_allclose(x[:N_MC] @ D.T, z[:N_MC], atol=2e-4)


# --- (e) the training-loss wrapper ---------------------------------------------------------------
def test_loss_at_the_exact_conditional_score_is_the_dsm_minimum():
    """Per example, E[‖ε̂ − ε‖²]/d given (t, s) at the exact conditional predictor is tr Cov(ε | x_t, z_s)/d
    = (1/d) Σ_i α² c_i / (α² c_i + σ²), c_i the eigenvalues of C(s) (which does not depend on z_s): the mean of
    (loss − minimum) over n examples must vanish within 5 SE; pairing x with another example's z costs far more."""
    n, s_max = 4096, 0.6
    x = images(MU + np.random.RandomState(6).randn(n, DIM) @ np.linalg.cholesky(SIG).T, H)
    inner = losses.get_sde_loss_fn(SDE_, APPLY[("vp", "nearest")], train=False, reduce_mean=True, precond=PRECOND)
    loss = jax.jit(sr_loss_fn(inner, AUG, s_max))
    params, key = oracle_params("nearest"), jax.random.PRNGKey(8)
    low = downsample(x, F)
    (_, aux), (_, aux_wrong) = (loss(params, key, {"x": x, "low_res": v}) for v in (low, jnp.roll(low, 1, axis=0)))
    t, s = np.asarray(aux["t"], np.float64), np.asarray(aux["aug_level"], np.float64)
    alpha, sigma = (np.asarray(v, np.float64) for v in SDE_.marginal_coeffs(jnp.asarray(t, jnp.float32)))
    a, b = (np.asarray(v, np.float64) for v in AUG.marginal_coeffs(jnp.asarray(s, jnp.float32)))
    k = a[:, None, None] ** 2 * (D @ SIG @ D.T) + b[:, None, None] ** 2 * np.eye(DIM_LOW)  # C(s) batched
    g = a[:, None, None] * np.einsum("ij,bjk->bik", SIG @ D.T, np.linalg.inv(k))
    lam_c = np.clip(np.linalg.eigvalsh(SIG - a[:, None, None] * g @ (D @ SIG)), 0.0, None)
    al2 = alpha[:, None] ** 2
    minimum = np.mean(al2 * lam_c / (al2 * lam_c + sigma[:, None] ** 2), axis=1)
    gap = np.asarray(aux["losses"], np.float64) - minimum
    wrong = np.mean(np.asarray(aux_wrong["losses"], np.float64) - minimum)
    se = gap.std() / math.sqrt(n)
    print(f"loss − minimum: {gap.mean():.5f} ± {se:.5f} (mean minimum {minimum.mean():.4f}); mismatched: +{wrong:.4f}")
    assert abs(gap.mean()) <= 5 * se and wrong > 20 * se


def test_loss_wrapper_draws_levels_and_noise_per_example_from_the_batch():
    """low_res_fn(batch["x"]) ≡ batch["low_res"]; s ~ U[0, s_max] per example; (z_s − α_s z)/σ_s is N(0, 1)
    noise independent of z (mean, variance, correlation within 5 SE, examples with s > 0.05); a shard with
    its global batch["index"] draws its examples' levels and noise exactly as the whole batch; s_max = 0
    leaves z as is."""
    def inner(params, rng, batch):
        return jnp.sum(params.low_res), {"low_res": params.low_res}

    x = jax.random.normal(jax.random.PRNGKey(0), (4096, 4, 4, 1))
    key, s_max = jax.random.PRNGKey(1), 0.5
    from_x = sr_loss_fn(inner, AUG, s_max, functools.partial(downsample, factor=F))
    given, given0 = sr_loss_fn(inner, AUG, s_max), sr_loss_fn(inner, AUG, 0.0)

    @jax.jit
    def run(x):
        low = downsample(x, F)
        return [fn(None, key, batch)[1] for fn, batch in (
            (from_x, {"x": x}), (given, {"x": x, "low_res": low}), (from_x, {"x": x[256:512], "index": jnp.arange(256, 512)}),
            (given0, {"x": x, "low_res": low}))] + [low]

    aux, aux2, aux_shard, aux0, low = jax.tree_util.tree_map(np.asarray, run(x))
    np.testing.assert_array_equal(aux["aug_level"], aux2["aug_level"])
    np.testing.assert_allclose(aux["low_res"], aux2["low_res"], rtol=1e-6, atol=1e-6)
    s = aux["aug_level"]
    assert s.min() >= 0 and s.max() <= s_max and abs(s.mean() - s_max / 2) < 5 * s_max / math.sqrt(12 * s.size)
    a, b = (np.asarray(v)[:, None, None, None] for v in AUG.marginal_coeffs(jnp.asarray(s)))
    keep = s > 0.05
    r = ((aux["low_res"] - a * low) / b)[keep].ravel()
    z = low[keep].ravel()
    n = r.size
    assert abs(r.mean()) < 5 / math.sqrt(n) and abs(r.var() - 1) < 5 * math.sqrt(2 / n)
    assert abs(np.corrcoef(r, z)[0, 1]) < 5 / math.sqrt(n)
    np.testing.assert_array_equal(aux_shard["aug_level"], s[256:512])
    np.testing.assert_allclose(aux_shard["low_res"], aux["low_res"][256:512], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(aux0["low_res"], low)


def test_cascade_augments_the_previous_stage_and_is_jittable():
    """A toy stage whose "sampler" returns up(z_s), under jit: at level 0 the output is up(base) exactly; at
    level s, (z_s − α_s z)/σ_s is N(0, 1) noise (mean and variance within 5 SE)."""
    z = jax.random.normal(jax.random.PRNGKey(2), (64, 8, 8, 1))
    base = lambda rng: (z, 0)  # noqa: E731
    toy = lambda rng, score: (score(None, None), 1)  # noqa: E731
    stages = lambda level: [SRStage(lambda z_s, s: Partial(lambda z_s, x, t: upsample(z_s, 2), z_s), toy, AUG,  # noqa: E731
                                    level)]
    run = jax.jit(lambda k: [cascade_sample(k, base, stages(level)) for level in (0.0, 0.3)])
    ((z0, up0), nfes), ((_, up), _) = run(jax.random.PRNGKey(3))
    assert [int(v) for v in nfes] == [0, 1]
    np.testing.assert_array_equal(np.asarray(up0), np.asarray(upsample(z, 2)))
    a, b = aug_coeffs(0.3)
    noise = (np.asarray(downsample(up, 2)) - a * np.asarray(z)) / b
    assert abs(noise.mean()) < 5 / math.sqrt(noise.size) and abs(noise.var() - 1) < 5 * math.sqrt(2 / noise.size)


# --- (5) a real tiny U-Net through the wrapper -------------------------------------------------
# GroupNorm(32) needs nf >= 32; at 32 channels (one per group) it erases the time/class embedding (a per-channel
# constant), so a second level of 64 channels lets y and t reach the output. num_res_blocks = 0 (one res block per
# decoder level, two in the middle) keeps the compile short. 3 input channels: x, up(z), level.
UNET = DDPM(nf=32, ch_mult=(1, 2), num_res_blocks=0, attn_resolutions=(), image_size=8, num_channels=3,
            dropout=0.0, num_classes=2)


def _random_like(shapes, seed: int):
    rng = np.random.default_rng(seed)
    fan = lambda s: math.prod(s.shape[:-1]) if len(s.shape) > 1 else 1  # noqa: E731
    return jax.tree_util.tree_map(lambda s: jnp.asarray(rng.normal(0.0, 1.0 / math.sqrt(fan(s)), s.shape), s.dtype),
                                  shapes)


def test_tiny_unet_through_the_wrapper_with_ddim():
    """One compile: DDIM (2 steps, no final denoising) through the wrapped class-conditional U-Net (random
    weights) on four variants of two examples sharing x_T (reference; low-res + 1; level + 0.2; the other
    class): shapes, finite samples, and each variant changes every example's sample (the low-res image, the
    level and y reach the network through get_score_fn and the sampler). That the noise labels pass
    unchanged is shown by the oracle tests, which read t from them."""
    b = 2
    x = jax.random.normal(jax.random.PRNGKey(0), (b, 8, 8, 1))
    low, level, y = downsample(x, 2), jnp.array([0.0, 0.3]), jnp.array([0, 1])
    net = _random_like(jax.eval_shape(lambda: UNET.init(jax.random.PRNGKey(0), sr_input(x, low, level),
                                                        jnp.zeros((b,)), y=y)), 1)
    apply_fn = sr_apply_fn(make_apply_fn(UNET), "bilinear")
    tile = lambda v: jnp.concatenate([v] * 4)  # noqa: E731
    lows, levels, ys = tile(low).at[2:4].add(1.0), tile(level).at[4:6].add(0.2), tile(y).at[6:].set(1 - y)

    @jax.jit
    def run(net, lows, levels, ys):
        score = get_score_fn(SDE_, apply_fn, SRParams(net, lows, levels), y=ys)
        return ddim_sample(jax.random.PRNGKey(1), SDE_, score, (4 * b, 8, 8, 1), 3, x_T=tile(x), denoise=False)

    out, nfe = run(net, lows, levels, ys)
    assert out.shape == (4 * b, 8, 8, 1) and int(nfe) == 2
    out = np.asarray(out).reshape(4, b, -1)
    assert np.all(np.isfinite(out))
    for k in range(1, 4):
        assert np.all(np.abs(out[k] - out[0]).max(axis=-1) > 1e-3), k
