"""Consistency models: boundary, CD/CT/iCT objectives and multistep sampling against the exact
consistency function of Gaussian data N(μ, s² I) under EDM (α = 1, σ_t = t).

The PF-ODE dx/dσ = σ(x − μ)/(s² + σ²) has the flow map x_σ' = μ + (x_σ − μ) sqrt(s² + σ'²)/sqrt(s² + σ²),
so f*(x, σ) = μ + (x − μ) r(σ), r(σ) = sqrt(s² + σ_min²)/sqrt(s² + σ²); the "exact network" is
F* = (f* − c_skip x)/c_out, which recovers (x, σ) from its inputs (c_in x, ¼ ln σ).
"""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm

from sdejax import consistency as cm
from sdejax.models.mlp import MLP
from sdejax.precond import Precond
from sdejax.sampling import grids
from sdejax.sampling.consistency import consistency_sample, onestep_sample
from sdejax.sde import EDMSDE
from sdejax.training.objective import Context

S, SMIN, SMAX, SD, RHO = 0.4, 0.002, 80.0, 0.5, 7.0  # s ≠ σ_d so that F* ≠ 0
MU = np.array([0.3, -0.2])
PRE = Precond.consistency(SD, SMIN)


def _r(sigma):
    return jnp.sqrt(S**2 + SMIN**2) / jnp.sqrt(S**2 + sigma**2)


def _mu(x):
    """μ in the dtype of x (a float64 numpy constant would leak across the tests' enable_x64 switches)."""
    return jnp.asarray(MU, x.dtype)


def f_star(x, sigma):
    return _mu(x) + (x - _mu(x)) * _r(sigma)[:, None]


def _net_inputs(x_in, labels):
    """(x, σ, c_skip, c_out) recovered from the network's inputs (c_in x, ¼ ln σ)."""
    sigma = jnp.exp(4.0 * labels)
    _, c_skip, c_out = PRE.scalings(jnp.ones_like(sigma), sigma)
    return x_in * jnp.sqrt(sigma**2 + SD**2)[:, None], sigma, c_skip[:, None], c_out[:, None]


def _as_F(f_value, x, c_skip, c_out):
    """(f − c_skip x)/c_out, 0 where c_out = 0 (there f = x whatever F is)."""
    safe = jnp.where(c_out == 0, 1.0, c_out)
    return jnp.where(c_out == 0, 0.0, (f_value - c_skip * x) / safe)


def exact_apply(params, x_in, labels, *, train=False, rng=None):
    """F_θ = θ F*, θ = params["scale"]."""
    x, sigma, c_skip, c_out = _net_inputs(x_in, labels)
    return params["scale"] * _as_F(f_star(x, sigma), x, c_skip, c_out)


def gaussian_score(x, sigma):
    return -(x - _mu(x)) / (S**2 + sigma[:, None] ** 2)


def exact_solver(score_fn, x, sigma, sigma_to):
    """The exact flow map σ → σ' (ignores the score)."""
    return _mu(x) + (x - _mu(x)) * (jnp.sqrt(S**2 + sigma_to**2) / jnp.sqrt(S**2 + sigma**2))[:, None]


def _context(params, step=0):
    return Context(step=jnp.asarray(step, jnp.int32), ema_params=params, target_params=params)


def _data(n, seed=0, dtype=jnp.float32):
    return {"x": jnp.asarray(MU, dtype) + S * jax.random.normal(jax.random.PRNGKey(seed), (n, 2), dtype)}


# (a) boundary and levels -------------------------------------------------------------------------
def test_boundary_is_identity_for_any_network():
    """f(x, σ_min) = x bit for bit for a random MLP (c_skip = 1, c_out = 0 exactly), and f depends on
    the network just above σ_min."""
    model = MLP(features=16, depth=1, embedding_type="positional", embedding_size=16)
    x = 3.0 * jax.random.normal(jax.random.PRNGKey(1), (8, 4))
    params = model.init(jax.random.key(2, impl="rbg"), x, jnp.ones(8))  # rbg: threefry initialisers compile slowly
    leaves, tree = jax.tree_util.tree_flatten(params)
    noise = np.random.default_rng(3)  # the zero-initialised output layer becomes random too
    params = jax.tree_util.tree_unflatten(tree, [p + noise.normal(size=p.shape).astype(np.float32) for p in leaves])
    apply = lambda p, x_in, labels, *, train=False, rng=None: model.apply(p, x_in, labels)
    f = jax.jit(lambda p, x, s: cm.get_consistency_fn(apply, p, SMIN, SD)(x, s))
    np.testing.assert_array_equal(f(params, x, jnp.full(8, SMIN)), x)
    assert float(jnp.max(jnp.abs(f(params, x, jnp.full(8, 2 * SMIN)) - x))) > 1e-4
    _, c_skip, c_out = PRE.scalings(jnp.ones(1), jnp.full(1, SMIN))
    assert float(c_skip[0]) == 1.0 and float(c_out[0]) == 0.0


def test_levels_are_karras_grid_reversed():
    with jax.enable_x64(True):
        for n in (2, 18, 151):
            levels = cm.karras_sigma(jnp.arange(n), n, SMIN, SMAX, RHO, dtype=jnp.float64)
            np.testing.assert_allclose(levels, grids.karras(EDMSDE(), n)[::-1], rtol=1e-12)


# (b) CD with an exact teacher step ---------------------------------------------------------------
def test_cd_loss_vanishes_at_exact_consistency_function_with_exact_step():
    """At F* with the exact flow map as the solver both outputs are μ + (x_n − μ) r(σ_n): the loss is 0
    up to float64 rounding of f (≲ 100 ulp of the largest intermediate, 1 + |x|)."""
    with jax.enable_x64(True):
        params = {"scale": jnp.float64(1.0)}
        obj = cm.cd_objective(exact_apply, lambda _: gaussian_score, num_scales=18, solver=exact_solver)
        batch = _data(512, dtype=jnp.float64)
        loss, aux = jax.jit(obj)(params, jax.random.PRNGKey(4), batch, _context(params))
        bound = (100 * np.finfo(np.float64).eps * (1 + np.abs(aux["sigma"]) * 5)) ** 2
        assert np.all(np.asarray(aux["losses"]) <= bound), float(loss)
        assert len(np.unique(np.asarray(aux["sigma"]))) == 17  # every level pair was drawn


# (c) CD with Heun: the local-error rate ----------------------------------------------------------
def _expected_cd_loss(n, solver):
    """E[loss] at F* in closed form (float64): the level-n term is (s² + σ_a²) r(σ_b)² (H − E)², with
    σ_a = σ_{n+1}, σ_b = σ_n, h = σ_b − σ_a, g = σ/(s² + σ²), E = sqrt((s² + σ_b²)/(s² + σ_a²)) the exact
    growth of x − μ and H = 1 + h g_a (Euler) or 1 + h/2 (g_a + g_b (1 + h g_a)) (Heun)."""
    sig = (SMIN ** (1 / RHO) + np.linspace(0, 1, n) * (SMAX ** (1 / RHO) - SMIN ** (1 / RHO))) ** RHO
    sb, sa = sig[:-1], sig[1:]
    g = lambda q: q / (S**2 + q**2)
    h = sb - sa
    H = 1 + h * g(sa) if solver == "euler" else 1 + h / 2 * (g(sa) + g(sb) * (1 + h * g(sa)))
    E = np.sqrt((S**2 + sb**2) / (S**2 + sa**2))
    return np.mean((S**2 + sa**2) * (S**2 + SMIN**2) / (S**2 + sb**2) * (H - E) ** 2)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _measured_cd_loss(n, solver):
    """The library's pieces (solver step on the exact score, consistency function at F*, l2) at every
    level pair, on the quadrature x₀ − μ = (s, s), z = (1, −1), for which mean (x_σ − μ)² = s² + σ²
    exactly: the loss is quadratic in x − μ, so this is the expectation over (x₀, z)."""
    i = jnp.arange(n - 1)
    sb, sa = cm.karras_sigma(i, n, SMIN, SMAX, RHO, jnp.float64), cm.karras_sigma(i + 1, n, SMIN, SMAX, RHO, jnp.float64)
    x_a = jnp.asarray(MU + S, jnp.float64) + sa[:, None] * jnp.array([1.0, -1.0], jnp.float64)
    f = cm.get_consistency_fn(exact_apply, {"scale": jnp.float64(1.0)}, SMIN, SD)
    x_b = cm.SOLVERS[solver](gaussian_score, x_a, sa, sb)
    return jnp.mean(cm.distance(f(x_a, sa), f(x_b, sb), "l2"))


def test_cd_heun_loss_falls_as_local_error_predicts():
    """Heun's local error is O(Δ³), so the l2 loss is O(Δu⁶) in the Karras variable u = σ^{1/ρ}:
    halving Δu (N − 1 → 2(N − 1)) divides it by 2⁶ = 64 asymptotically. The measured losses equal the
    closed form to float64 rounding (rtol 1e-6), and the exact ratios 69.64, 67.46, 65.91 approach 64 as
    64(1 + a/(N − 1)) (the O(Δ⁴) term; a ≈ 1.5–2.1 here, bounded by 2.5). Euler (O(Δ²)) gives ≈ 16."""
    with jax.enable_x64(True):
        ns = (18, 35, 69, 137)
        heun = [float(_measured_cd_loss(n, "heun")) for n in ns]
        euler = [float(_measured_cd_loss(n, "euler")) for n in ns[:3]]
    np.testing.assert_allclose(heun, [_expected_cd_loss(n, "heun") for n in ns], rtol=1e-6)
    np.testing.assert_allclose(euler, [_expected_cd_loss(n, "euler") for n in ns[:3]], rtol=1e-6)
    ratios = np.array(heun[:-1]) / np.array(heun[1:])
    np.testing.assert_allclose(ratios, [69.64, 67.46, 65.91], atol=0.01)
    assert np.all(np.diff(ratios) < 0)
    assert np.all((ratios > 64) & (ratios < 64 * (1 + 2.5 / (np.array(ns[:-1]) - 1))))
    e_ratios = np.array(euler[:-1]) / np.array(euler[1:])
    assert np.all(np.abs(e_ratios - 16) < 16 * 2.5 / (np.array(ns[:2]) - 1))


def test_cd_objective_heun_matches_expected_loss():
    """The CD objective (uniform levels, random x₀ and z, float32) at F* has mean loss = the closed form
    E[loss] for N = 18 within 4.5 Monte-Carlo standard errors."""
    params = {"scale": jnp.float32(1.0)}
    obj = cm.cd_objective(exact_apply, lambda _: gaussian_score, num_scales=18, solver="heun")
    loss, aux = jax.jit(obj)(params, jax.random.PRNGKey(5), _data(32768, 1), _context(params))
    losses = np.asarray(aux["losses"], np.float64)
    se = losses.std() / math.sqrt(losses.size)
    assert abs(losses.mean() - _expected_cd_loss(18, "heun")) < 4.5 * se, (losses.mean(), se)
    assert _expected_cd_loss(18, "heun") > 20 * se  # the loss is resolved, not zero


# (d) multistep sampling with the exact f -----------------------------------------------------------
@pytest.mark.parametrize("sigmas", [[SMAX], [SMAX, 0.821], [SMAX, 10.0, 0.821, 0.1]], ids=["1", "2", "4"])
def test_multistep_sampling_with_exact_f(sigmas):
    """x = σ_0 z is N(0, σ_0²), not the true N(μ, s² + σ_0²): the output is Gaussian with (mean m, var v)
    from the recursion m ← μ + (m − μ) r(σ_i), v ← v r(σ_i)², then v += σ_{i+1}² − σ_min². Samples match it
    within 4.5 SE (20000 per dimension), and it is N(μ, s² + σ_min²) to |μ| r(σ_max) < 0.002 and 1e-4 relative."""
    f = cm.get_consistency_fn(exact_apply, {"scale": jnp.float32(1.0)}, SMIN, SD)
    run = jax.jit(lambda f, key, s: consistency_sample(f, key, (20000, 2), s, SMIN)[0])
    x = np.asarray(run(f, jax.random.PRNGKey(len(sigmas)), jnp.asarray(sigmas)), np.float64)
    m, v = np.zeros(2), sigmas[0] ** 2
    for i, s in enumerate(sigmas):
        r = math.sqrt(S**2 + SMIN**2) / math.sqrt(S**2 + s**2)
        m, v = MU + (m - MU) * r, v * r**2
        if i + 1 < len(sigmas):
            v += sigmas[i + 1] ** 2 - SMIN**2
    n = x.shape[0]
    assert np.all(np.abs(x.mean(0) - m) < 4.5 * math.sqrt(v / n))
    assert np.all(np.abs(x.var(0) - v) < 4.5 * v * math.sqrt(2 / (n - 1)))
    assert np.all(np.abs(m - MU) < 0.002) and abs(v / (S**2 + SMIN**2) - 1) < 1e-4
    assert consistency_sample(f, jax.random.PRNGKey(0), (4, 2), sigmas, SMIN)[1] == len(sigmas)


def test_onestep_sample_is_f_at_sigma_max():
    f = cm.get_consistency_fn(exact_apply, {"scale": jnp.float32(1.0)}, SMIN, SD)
    key = jax.random.PRNGKey(7)
    x, nfe = onestep_sample(f, key, (16, 2), SMAX)
    z = jax.random.normal(jax.random.split(key, 1)[0], (16, 2))
    np.testing.assert_allclose(x, f_star(SMAX * z, jnp.full(16, SMAX)), rtol=1e-5, atol=1e-6)
    assert nfe == 1
    with pytest.raises(ValueError, match="strictly decreasing"):
        consistency_sample(f, key, (4, 2), [1.0, 5.0], SMIN)


# (e) CT: same z, its gradient at F*, schedules ----------------------------------------------------
def _ct_terms(n):
    sig = (SMIN ** (1 / RHO) + np.linspace(0, 1, n) * (SMAX ** (1 / RHO) - SMIN ** (1 / RHO))) ** RHO
    sb, sa = sig[:-1], sig[1:]
    r = lambda q: math.sqrt(S**2 + SMIN**2) / np.sqrt(S**2 + q**2)
    return sa, sb, r(sa), r(sb)


def test_ct_loss_and_gradient_at_exact_function():
    """CT at F*: per dimension D = f*(x₀ + σ_a z) − f*(x₀ + σ_b z) = (r_a − r_b) e + (r_a σ_a − r_b σ_b) z
    (e = x₀ − μ), so E[loss] = mean_n (r_a − r_b)² s² + (r_a σ_a − r_b σ_b)² with the same z (an independent
    z' would add 2 r_a r_b σ_a σ_b, ≈ 2 s² at large σ). The gradient w.r.t. a scale θ (F = θ F*) at θ = 1
    is E[2 D c_out F*] = mean_n 2 (r_a − c_skip,a)((r_a − r_b) s² + (r_a σ_a − r_b σ_b) σ_a): not zero
    (2.9e-3 at N = 11; it falls about 4× per doubling of N, 1.1e-7 at N = 1281). Both match the objective's per-example values (forward-mode in θ) within 4.5 SE."""
    total, n = 1000, 11
    step = next(k for k in range(total) if int(cm.ct_num_scales(k, total)) == n)
    obj = cm.ct_objective(exact_apply, total)
    params = {"scale": jnp.float32(1.0)}
    per_example = lambda th: obj({"scale": th}, jax.random.PRNGKey(8), _data(32768, 2), _context(params, step))[1]
    aux, d_aux = jax.jit(lambda th: jax.jvp(per_example, (th,), (jnp.float32(1.0),)))(jnp.float32(1.0))
    assert int(aux["num_scales"]) == n
    aux, d_losses = aux["losses"], d_aux["losses"]
    sa, sb, ra, rb = _ct_terms(n)
    c_skip = SD**2 / ((sa - SMIN) ** 2 + SD**2)
    expected_loss = np.mean((ra - rb) ** 2 * S**2 + (ra * sa - rb * sb) ** 2)
    expected_grad = np.mean(2 * (ra - c_skip) * ((ra - rb) * S**2 + (ra * sa - rb * sb) * sa))
    for values, expected in ((aux, expected_loss), (d_losses, expected_grad)):
        values = np.asarray(values, np.float64)
        se = values.std() / math.sqrt(values.size)
        assert abs(values.mean() - expected) < 4.5 * se and expected > 10 * se, (values.mean(), expected, se)
    independent = expected_loss + np.mean(2 * ra * rb * sa * sb)
    assert independent > expected_loss + 50 * np.asarray(aux).std() / math.sqrt(32768)


def test_ct_schedules():
    """N(k) = ⌈sqrt(k/K((s₁+1)² − s₀²) + s₀²) − 1⌉ + 1: 2 at k = 0, 151 at k = K; μ(k) = exp(s₀ ln μ₀/N(k))
    (paper, followed by default: μ(0) = μ₀ = 0.9) vs the reference code's exp(s₀ ln μ₀/(N(k) − 1)) (0.81)."""
    K = 10000
    for k in (0, 1, 137, 2500, 5000, 9999, K, 2 * K):
        kk = min(k, K)
        n = math.ceil(math.sqrt(kk / K * (151**2 - 4) + 4) - 1) + 1
        assert int(cm.ct_num_scales(k, K)) == n
        np.testing.assert_allclose(cm.ct_ema_rate(k, K), math.exp(2 * math.log(0.9) / n), rtol=1e-6)
        np.testing.assert_allclose(cm.ct_ema_rate(k, K, convention="reference"),
                                   math.exp(2 * math.log(0.9) / (n - 1)), rtol=1e-6)
    assert int(cm.ct_num_scales(0, K)) == 2 and int(cm.ct_num_scales(K, K)) == 151
    np.testing.assert_allclose([cm.ct_ema_rate(0, K), cm.ct_ema_rate(0, K, convention="reference")], [0.9, 0.81],
                               rtol=1e-6)


def test_ict_schedule_and_lognormal_levels():
    """iCT's N(k) runs 11, 21, …, 1281 in 8 stages of K' = ⌊K/8⌋; p(n) is the normal CDF mass of ln σ
    on [ln σ_n, ln σ_{n+1}), sums to 1, and `sample_levels` draws it (χ²-style bound, 200000 draws)."""
    K = 400_000
    stages = [int(cm.ict_num_scales(k, K)) for k in range(0, K, K // 8)]
    assert stages == [11, 21, 41, 81, 161, 321, 641, 1281]
    assert int(cm.ict_num_scales(K // 8 - 1, K)) == 11 and int(cm.ict_num_scales(10 * K, K)) == 1281
    n = 21
    p = cm.lognormal_level_probs(n)
    sig = grids.karras(EDMSDE(), n)[::-1]
    cdf = norm.cdf((np.log(sig) + 1.1) / 2.0)
    np.testing.assert_allclose(p, np.diff(cdf) / (cdf[-1] - cdf[0]), rtol=1e-10)
    np.testing.assert_allclose(p.sum(), 1.0, rtol=1e-12)
    u = jax.random.uniform(jax.random.PRNGKey(9), (200_000,))
    idx = np.asarray(jax.jit(lambda u, n: cm.sample_levels(u, n, "lognormal"))(u, n))
    freq = np.bincount(idx, minlength=n - 1) / u.size
    assert idx.min() >= 0 and idx.max() <= n - 2
    assert np.all(np.abs(freq - p) < 4.5 * np.sqrt(p * (1 - p) / u.size) + 1e-5)


# (f) pseudo-Huber on the whole example ------------------------------------------------------------
def test_pseudo_huber_is_on_the_whole_example_norm():
    """d = 100, δ = 0.01 per element, c = 0.00054·10: sqrt(‖δ‖² + c²) − c = sqrt(0.01 + c²) − c ≈ 0.0948,
    while the per-element version Σ (sqrt(δ² + c²) − c) ≈ 0.597; limits c → 0 (‖δ‖, not squared) and
    ‖δ‖ ≪ c (‖δ‖²/(2c))."""
    a = jnp.zeros((2, 10, 10))
    b = a.at[0].set(0.01).at[1].set(1e-5)
    c = 0.00054 * 10
    got = np.asarray(cm.distance(b, a, "pseudo_huber"), np.float64)
    np.testing.assert_allclose(got[0], math.sqrt(0.01 + c**2) - c, rtol=1e-5)
    assert abs(got[0] - 100 * (math.sqrt(1e-4 + c**2) - c)) > 0.4
    np.testing.assert_allclose(got[1], 100 * 1e-10 / (2 * c), rtol=1e-2)
    np.testing.assert_allclose(cm.distance(b, a, "pseudo_huber", c=0.0)[0], 0.1, rtol=1e-5)
    np.testing.assert_allclose(cm.distance(b, a, "l2")[0], 1e-4, rtol=1e-5)
    np.testing.assert_allclose(cm.distance(b, a, "l1")[0], 1e-2, rtol=1e-5)


# (g) the same dropout mask for student and target ---------------------------------------------------
class _Mask(nn.Module):
    @nn.compact
    def __call__(self, x, train):
        return nn.Dropout(0.5, deterministic=not train)(jnp.ones_like(x))


def dropout_apply(params, x_in, labels, *, train=False, rng=None):
    """f = dropout mask (0 or 2 per element) above σ_min, whatever x and σ: only the key matters."""
    x, _, c_skip, c_out = _net_inputs(x_in, labels)
    return _as_F(_Mask().apply({}, x_in, train, rngs={"dropout": rng}), x, c_skip, c_out)


@pytest.mark.parametrize("kind", ["cd", "ct", "ict"])
def test_student_and_target_share_the_dropout_mask(kind):
    """With θ⁻ = θ the distance of every pair above σ_min is 0 (float32 rounding of c_skip x) only if both
    calls draw the same mask; two keys give masks differing in about half the elements."""
    if kind == "cd":
        obj = cm.cd_objective(dropout_apply, lambda _: gaussian_score, num_scales=18, solver=exact_solver)
    elif kind == "ct":
        obj = cm.ct_objective(dropout_apply, 1000)
    else:
        obj = cm.ict_objective(dropout_apply, 1000)
    params = {"scale": jnp.float32(1.0)}
    _, aux = jax.jit(obj)(params, jax.random.PRNGKey(10), _data(64, 3), _context(params, 500))
    sigma, sigma_target = np.asarray(aux["sigma"]), np.asarray(aux["sigma_target"])
    above = sigma_target > SMIN * 1.0001
    assert above.sum() >= 32
    # iCT weights by 1/(σ_{n+1} − σ_n): compare the distance itself. Rounding of f is ≲ 100 ulp of |x| ≲ 300,
    # |δ| ≲ 1e-4: l2 ≲ 1e-8 and pseudo-Huber ≲ ‖δ‖²/(2c) ≲ 1.3e-5 (c = 0.00054 √2); different masks give ≈ 2.
    dist = np.asarray(aux["losses"]) * ((sigma - sigma_target) if kind == "ict" else 1.0)
    assert np.all(dist[above] < 1e-4), dist[above].max()
    f = cm.get_consistency_fn(dropout_apply, params, SMIN, SD, train=True, rng=jax.random.PRNGKey(0))
    g = cm.get_consistency_fn(dropout_apply, params, SMIN, SD, train=True, rng=jax.random.PRNGKey(1))
    x, s = jnp.ones((4, 2)), jnp.full(4, 1.0)
    assert float(jnp.mean(jnp.abs(f(x, s) - g(x, s)))) > 0.2


def test_cd_teacher_reads_context_teacher_params():
    seen = []
    teacher = lambda p: seen.append(p) or gaussian_score
    obj = cm.cd_objective(exact_apply, teacher, num_scales=4)
    params, teacher_params = {"scale": jnp.float32(1.0)}, {"w": jnp.ones(3)}
    ctx = Context(step=jnp.int32(0), ema_params=params, target_params=params, teacher_params=teacher_params)
    obj(params, jax.random.PRNGKey(0), _data(4), ctx)
    assert len(seen) == 1 and seen[0] is teacher_params


def test_bad_options_fail_fast():
    with pytest.raises(ValueError, match="valid"):
        cm.cd_objective(exact_apply, lambda _: gaussian_score, solver="rk4")
    with pytest.raises(ValueError, match="valid"):
        cm.ct_objective(exact_apply, 10, distance_kind="lpips")
    with pytest.raises(ValueError, match="valid"):
        cm.ct_ema_rate(0, 10, convention="code")
    with pytest.raises(ValueError, match="num_scales"):
        cm.cd_objective(exact_apply, lambda _: gaussian_score, num_scales=1)
    obj = cm.ct_objective(exact_apply, 10)
    params = {"scale": jnp.float32(1.0)}
    with pytest.raises(ValueError, match="target_params"):
        obj(params, jax.random.PRNGKey(0), _data(4), Context(step=jnp.int32(0), ema_params=params))
