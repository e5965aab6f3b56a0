"""Guided consistency distillation (LCM): w-embedding, guided CD objective, skipping step, sampling.

Oracle data: two classes, each one Gaussian N(μ_y, s² I) (`analytic.GaussianMixture`, exact class
scores). Under EDM (α = 1, σ_t = t) with an "unconditional" model N(μ_u, s² I) of the same variance,
the CFG score s_c + w(s_c − s_u) = −(1+w)(x − μ_y)/(s² + σ²) + w(x − μ_u)/(s² + σ²) = −(x − μ̃)/(s² + σ²),
μ̃ = μ_y + w(μ_y − μ_u): the guided PF-ODE is that of N(μ̃, s² I), with flow map
x_σ' = μ̃ + (x_σ − μ̃) sqrt(s² + σ'²)/sqrt(s² + σ²) and consistency function f*(x, σ; y, w) =
μ̃ + (x − μ̃) r(σ), r(σ) = sqrt(s² + σ_min²)/sqrt(s² + σ²). At w = 0 μ̃ = μ_y whatever s_u is (the
mixture marginal is used there). With the exact flow map as the teacher step, student f*(x_{n+k}, σ_{n+k})
and target f*(x_n, σ_n) coincide for every level pair (n, n + k): the loss is 0 up to rounding.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdejax import consistency as cm
from sdejax.analytic import GaussianMixture
from sdejax.models.ddpm import DDPM
from sdejax.models.dit import DiT
from sdejax.models.mlp import MLP, make_apply_fn
from sdejax.models.ncsnpp import NCSNpp
from sdejax.precond import Precond
from sdejax.sampling.consistency import consistency_sample
from sdejax.sde import EDMSDE
from sdejax.training.objective import Context

S, SMIN, SMAX, SD = 0.4, 0.002, 80.0, 0.5
MEANS = np.array([[1.0, 0.5], [-0.8, 0.3]])
MU_U = np.array([0.1, -0.4])  # the Gaussian "unconditional" model's mean (variance s² as the classes')
PRE = Precond.consistency(SD, SMIN)


def _mix():
    """The mixture with its leaves recomputed in the current default float precision (`create` stores
    float32 even under x64, and s² in float32 alone has relative error ~3e-8)."""
    mix = GaussianMixture.create(np.array([0.5, 0.5]), MEANS, std=S)
    eye = np.broadcast_to(np.eye(2), (2, 2, 2))
    exact = (np.array([0.5, 0.5]), MEANS, S**2 * eye, np.full((2, 2), S**2), eye)
    tree = jax.tree_util.tree_structure(mix)
    return jax.tree_util.tree_unflatten(tree, [jnp.asarray(v, jnp.result_type(float)) for v in exact])


MIX = _mix()
B = 64


def _mu_tilde(y, w, dtype):
    mu = jnp.asarray(MEANS, dtype)[y]
    return mu + w[:, None] * (mu - jnp.asarray(MU_U, dtype))


def _r(sigma, to=SMIN):
    return jnp.sqrt(S**2 + to**2) / jnp.sqrt(S**2 + sigma**2)


def exact_apply(params, x_in, labels, *, train=False, rng=None, y=None, w=None):
    """F* = (f* − c_skip x)/c_out of the guided f*, x and σ recovered from (c_in x, ¼ ln σ); 0 where c_out = 0."""
    sigma = jnp.exp(4.0 * labels)
    _, c_skip, c_out = (v[:, None] for v in PRE.scalings(jnp.ones_like(sigma), sigma))
    x = x_in * jnp.sqrt(sigma**2 + SD**2)[:, None]
    mu = _mu_tilde(y, w, x.dtype)
    f = mu + (x - mu) * _r(sigma)[:, None]
    safe = jnp.where(c_out == 0, 1.0, c_out)
    return params["scale"] * jnp.where(c_out == 0, 0.0, (f - c_skip * x) / safe)


def teacher_fn(uncond):
    """score_fn(x, σ, y=): the exact class score; y=None: the mixture marginal or the Gaussian N(μ_u, s²)."""
    mix = _mix()

    def score(x, sigma, y=None):
        if y is not None or uncond == "mixture":
            return mix.marginal_score(EDMSDE(), x, sigma, y)
        return -(x - jnp.asarray(MU_U, x.dtype)) / (S**2 + sigma[:, None] ** 2)
    return lambda _: score


def gaussian_exact_solver(score_fn, x, sigma, sigma_to):
    """The exact flow map of any N(m, s² I): m = x + (s² + σ²) score, x' = m + (x − m) sqrt(s² + σ'²)/sqrt(s² + σ²)."""
    m = x + (S**2 + sigma**2)[:, None] * score_fn(x, sigma)
    return m + (x - m) * (jnp.sqrt(S**2 + sigma_to**2) / jnp.sqrt(S**2 + sigma**2))[:, None]


def _batch(dtype):
    y = jnp.arange(B) % 2
    x = jnp.asarray(MEANS, dtype)[y] + S * jax.random.normal(jax.random.PRNGKey(1), (B, 2), dtype)
    return {"x": x, "y": y}


def _context(params):
    return Context(step=jnp.asarray(0, jnp.int32), ema_params=params, target_params=params, teacher_params=None)


# (a) the w-embedding ------------------------------------------------------------------------------
def _mlps():
    kw = dict(features=16, depth=2, embedding_type="fourier_linear", embedding_size=16, num_classes=2)
    return MLP(**kw), MLP(**kw, guidance_embedding=True)


def _networks(name):
    """(plain, w-conditioned, x, labels) of a tiny network of each family."""
    if name == "mlp":
        return (*_mlps(), jnp.ones((4, 2)) * 0.3, jnp.array([-1.5, -0.2, 0.0, 0.7]))
    unet = dict(image_size=8, num_channels=1, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), dropout=0.0,
                num_classes=3)
    kw = {"ddpm": dict(nf=32, **unet), "ncsnpp": dict(nf=16, embedding_type="positional", **unet),
          "dit": dict(image_size=8, num_channels=1, patch_size=2, num_classes=3, shape=(2, 32, 4))}[name]
    cls = {"ddpm": DDPM, "ncsnpp": NCSNpp, "dit": DiT}[name]
    x = jax.random.normal(jax.random.PRNGKey(3), (4, 8, 8, 1))
    return cls(**kw), cls(**kw, guidance_embedding=True), x, jnp.array([-1.5, -0.2, 0.0, 0.7])


@pytest.mark.parametrize("name", ["mlp", "ddpm", "ncsnpp", "dit"])
def test_w_embedding_zero_init_is_the_unconditioned_network(name):
    """Zero kernel and bias: temb + 0·e(w) + 0 = temb exactly, so at init the w-network's output equals
    the plain network's (same shared params) bit for bit for any w; a nonzero kernel makes w matter."""
    plain, guided, x, labels = _networks(name)
    y, w = jnp.array([0, 1, 2, 1]), jnp.array([0.0, 1.0, 3.5, 7.0])
    params = guided.init(jax.random.PRNGKey(0), x, labels, y=y, w=w)
    drop = lambda tree: {**tree, "params": {k: v for k, v in tree["params"].items() if k != "guidance_embed"}}  # noqa: E731
    assert set(params["params"]) - set(drop(params)["params"]) == {"guidance_embed"}
    out = guided.apply(params, x, labels, y=y, w=w)
    assert jnp.array_equal(out, plain.apply(drop(params), x, labels, y=y))
    bumped = jax.tree_util.tree_map(lambda a: a + 0.1, params)
    assert not jnp.allclose(guided.apply(bumped, x, labels, y=y, w=w), plain.apply(drop(bumped), x, labels, y=y))
    with pytest.raises(ValueError, match="guidance weight w"):
        guided.apply(params, x, labels, y=y)


# (b) guided CD at w = 0, k = 1 is plain CD ---------------------------------------------------------
def test_guided_cd_at_w0_k1_is_plain_cd_bitwise():
    """w ≡ 0: s_c + 0·(s_c − s_u) = s_c exactly, and the level/noise keys are the plain objective's, so a
    plain CD whose teacher is the class score and whose network is handed the same (y, w = 0) agrees bit for bit."""
    _, guided = _mlps()
    apply = make_apply_fn(guided)
    batch = _batch(jnp.float32)
    params = guided.init(jax.random.PRNGKey(0), batch["x"], jnp.zeros(B), y=batch["y"], w=jnp.ones(B))
    params = jax.tree_util.tree_map(lambda a: a + 0.05, params)  # nonzero output layer and w-embedding
    zeros = jnp.zeros(B)
    plain_apply = lambda p, x, l, *, train=False, rng=None: apply(p, x, l, train=train, rng=rng, y=batch["y"], w=zeros)
    plain = cm.cd_objective(plain_apply, lambda _: MIX.score_fn(EDMSDE(), batch["y"]), num_scales=18)
    ours = cm.guided_cd_objective(apply, teacher_fn("mixture"), w_range=(0.0, 0.0), skip=1, num_scales=18)
    rng, ctx = jax.random.PRNGKey(3), _context(params)
    (l1, a1), (l2, a2) = plain(params, rng, batch, ctx), ours(params, rng, batch, ctx)
    assert jnp.array_equal(l1, l2) and jnp.array_equal(a1["losses"], a2["losses"])
    assert jnp.array_equal(a2["w"], zeros) and float(l1) > 0


# (c) exact guided flow map: loss 0 for every w and skip k ------------------------------------------
@pytest.mark.parametrize("w_range,uncond", [((0.0, 0.0), "mixture"), ((0.5, 4.0), "gaussian")])
@pytest.mark.parametrize("skip", [1, 4, 17])
def test_guided_cd_loss_vanishes_at_exact_guided_consistency_function(w_range, uncond, skip):
    """float64: both outputs are μ̃ + (x − μ̃)r(·) evaluated from |x| ≲ 4σ_max; their rounding is
    ≲ 100 ulp · 400 ≈ 1e-11, so the mean squared difference is < 1e-20. Control: a student told the
    wrong w (w + 1, μ̃ off by μ_y − μ_u) has loss ≥ ((r(σ_n) − r(σ_{n+k}))‖μ_y − μ_u‖)²/2 ≫ 1e-20."""
    with jax.enable_x64(True):
        batch = _batch(jnp.float64)
        params = {"scale": jnp.float64(1.0)}
        obj = cm.guided_cd_objective(exact_apply, teacher_fn(uncond), w_range=w_range, skip=skip,
                                     num_scales=18, solver=gaussian_exact_solver)
        loss, aux = obj(params, jax.random.PRNGKey(7), batch, _context(params))
        assert float(loss) < 1e-20
        assert bool(jnp.all((aux["w"] >= w_range[0]) & (aux["w"] <= w_range[1])))
        ratio = aux["sigma"] / aux["sigma_target"]
        levels = [cm.karras_sigma(i, 18, dtype=jnp.float64) for i in range(18)]
        assert bool(jnp.all(jnp.isclose(jnp.asarray(levels)[skip:][None, :] / jnp.asarray(levels)[:-skip][None, :],
                                        ratio[:, None], rtol=1e-12).any(axis=1)))
        wrong = lambda p, x, l, *, train=False, rng=None, y=None, w=None: exact_apply(p, x, l, y=y, w=w + 1.0)
        obj_wrong = cm.guided_cd_objective(wrong, teacher_fn(uncond), w_range=w_range, skip=skip, num_scales=18,
                                           solver=gaussian_exact_solver)
        assert float(obj_wrong(params, jax.random.PRNGKey(7), batch, _context(params))[0]) > 1e-12


# (d) sampling with a class and w ---------------------------------------------------------------------
def test_consistency_sample_with_class_and_w():
    """The conditioning rides in the Partial through jit: one step is μ̃ + (σ_max z − μ̃) r(σ_max), two steps
    apply f* again to x₁ + sqrt(σ₁² − σ_min²) z₁ (z_i = normal(split(rng, n)[i])); float32, rtol 1e-5."""
    y, w = jnp.arange(8) % 2, jnp.linspace(0.0, 3.0, 8)
    f = cm.get_consistency_fn(exact_apply, {"scale": jnp.float32(1.0)}, SMIN, SD, y=y, w=w)
    rng, mu = jax.random.PRNGKey(5), _mu_tilde(y, w, jnp.float32)
    sample = jax.jit(lambda f, rng: consistency_sample(f, rng, (8, 2), [SMAX, 0.8], SMIN)[0])(f, rng)
    k0, k1 = jax.random.split(rng, 2)
    x1 = mu + (SMAX * jax.random.normal(k0, (8, 2)) - mu) * _r(jnp.float32(SMAX))
    x2 = x1 + jnp.sqrt(0.8**2 - SMIN**2) * jax.random.normal(k1, (8, 2))
    np.testing.assert_allclose(sample, mu + (x2 - mu) * _r(jnp.float32(0.8)), rtol=1e-5, atol=1e-5)


# (e) the Fourier embedding of labels ≤ 0 --------------------------------------------------------------
def test_fourier_embedding_of_nonpositive_labels():
    """"fourier" takes log(labels): labels ≤ 0 are a clear error (not a NaN); "fourier_linear" embeds the
    labels as given, so at labels l it equals "fourier" at exp(l) with the same params up to the rounding
    of log(exp(l)) (≤ 2 ulp of |l| ≤ 2, times 2π|W| ≲ 2π·16·4 in the phase: atol 1e-3 on O(1) outputs)."""
    x, labels = jnp.ones((3, 2)) * 0.3, jnp.array([-1.5, -0.25, 0.5])
    lin = MLP(features=16, depth=1, embedding_type="fourier_linear", embedding_size=16)
    log = MLP(features=16, depth=1, embedding_type="fourier", embedding_size=16)
    params = jax.tree_util.tree_map(lambda a: a + 0.05, lin.init(jax.random.PRNGKey(0), x, labels))
    out = lin.apply(params, x, labels)
    assert bool(jnp.all(jnp.isfinite(out)))
    np.testing.assert_allclose(out, log.apply(params, x, jnp.exp(labels)), atol=1e-3)
    with pytest.raises(ValueError, match="labels > 0"):
        log.apply(params, x, labels)
