"""Guidance transforms against the closed-form class-conditional mixture (one component per class).

For p_0 = Σ_k w_k N(μ_k, Σ_k) with class k = component k, p_t(y | x) = w_y N_y,t(x) / Σ_k w_k N_k,t(x)
and ∇ log p_t(x | y) is the component's score, so every identity below holds to float rounding:
exact classifier guidance at scale 1 = the conditional score; CFG with w = 0 = the conditional score;
CFG(w) = classifier guidance with γ = 1 + w; CFG in ε-, x₀- or v-space = CFG in score space.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdejax import guidance
from sdejax.analytic import GaussianMixture
from sdejax.sampling import methods
from sdejax.score import convert
from sdejax.sde import VESDE, VPSDE

jax.config.update("jax_enable_x64", False)

MIX = GaussianMixture.create([0.5, 0.3, 0.2], [[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]],
                             covs=[[[0.3, 0.1], [0.1, 0.2]], [[0.2, 0.0], [0.0, 0.4]], [[0.25, -0.05], [-0.05, 0.25]]])
SDES = {"vp": VPSDE(), "ve": VESDE(sigma_max=10.0)}
TIMES = (0.05, 0.3, 0.7, 1.0)
B = 64


def points(sde, t, key=0):
    """x_t drawn from the marginal at t (the region where guidance acts), and their classes."""
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(key), 3)
    x0 = MIX.sample(k1, B)
    alpha, sigma = sde.marginal_coeffs(jnp.full((B,), t))
    x = alpha[:, None] * x0 + sigma[:, None] * jax.random.normal(k2, x0.shape)
    return x, jnp.full((B,), t), jax.random.randint(k3, (B,), 0, 3)


def close(a, b, scale):
    """Equal to float32 rounding of values of size `scale` (a few ulps of the largest term)."""
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize("name", list(SDES))
@pytest.mark.parametrize("t", TIMES)
def test_exact_classifier_guidance_is_the_conditional_score(name, t):
    sde = SDES[name]
    x, tt, y = points(sde, t)
    cond = MIX.score_fn(sde, y)(x, tt)
    guided = guidance.classifier_guidance(MIX.score_fn(sde), MIX.classifier_fn(sde), y, 1.0)(x, tt)
    close(guided, cond, float(jnp.abs(cond).max()))


@pytest.mark.parametrize("name", list(SDES))
@pytest.mark.parametrize("w", [0.0, 1.5, 4.0])
def test_cfg_equals_classifier_guidance_at_one_plus_w(name, w):
    sde = SDES[name]
    for t in TIMES:
        x, tt, y = points(sde, t, key=1)
        c, u = MIX.score_fn(sde, y), MIX.score_fn(sde)
        out = guidance.cfg(sde, c, u, w)(x, tt)
        ref = guidance.classifier_guidance(u, MIX.classifier_fn(sde), y, 1.0 + w)(x, tt)
        close(out, ref, (1 + w) * float(jnp.abs(ref).max()))
        if w == 0.0:
            np.testing.assert_array_equal(np.asarray(out), np.asarray(c(x, tt)))


@pytest.mark.parametrize("space", ["eps", "x0", "v"])
def test_plain_cfg_is_the_same_in_every_parameterisation(space):
    """x̂₀ of CFG applied to the ε / x₀ / v predictions equals x̂₀ of CFG on the score (affine maps)."""
    sde, w = SDES["vp"], 2.0
    for t in TIMES:
        x, tt, y = points(sde, t, key=2)
        a, s = sde.marginal_coeffs(tt)
        pc, pu = (convert(f(x, tt), "score", space, x, a, s) for f in (MIX.score_fn(sde, y), MIX.score_fn(sde)))
        by_space = convert(pc + w * (pc - pu), space, "x0", x, a, s)
        ref = convert(guidance.cfg(sde, MIX.score_fn(sde, y), MIX.score_fn(sde), w)(x, tt), "score", "x0", x, a, s)
        close(by_space, ref, 3 * float(jnp.abs(ref).max()))


def test_rescale_definition_and_its_space():
    """φ = 0 is plain CFG; φ = 1 gives the guided prediction the conditional one's per-example std in
    the named space; the result depends on the space (the rescale is not affine)."""
    sde, w, t = SDES["vp"], 3.0, 0.5
    x, tt, y = points(sde, t, key=3)
    a, s = sde.marginal_coeffs(tt)
    c, u = MIX.score_fn(sde, y), MIX.score_fn(sde)
    plain = guidance.cfg(sde, c, u, w)(x, tt)
    np.testing.assert_array_equal(np.asarray(guidance.cfg(sde, c, u, w, rescale=0.0, space="v")(x, tt)),
                                  np.asarray(plain))
    outs = {}
    for space in ("eps", "v"):
        out = convert(guidance.cfg(sde, c, u, w, rescale=1.0, space=space)(x, tt), "score", space, x, a, s)
        ref = convert(c(x, tt), "score", space, x, a, s)
        np.testing.assert_allclose(np.std(np.asarray(out), -1), np.std(np.asarray(ref), -1), rtol=1e-4)
        outs[space] = convert(out, space, "score", x, a, s)
    assert float(jnp.max(jnp.abs(outs["eps"] - outs["v"]))) > 1e-2 * float(jnp.max(jnp.abs(plain)))


def test_guidance_interval():
    """An interval covering every σ̃ is plain CFG; one outside them is the conditional score, at which
    the unconditional score is never evaluated (a NaN unconditional score does not leak). The branch
    is compiled (lax.cond), so values agree to rounding."""
    sde, w = SDES["vp"], 2.0
    nan_uncond = lambda x, t: jnp.full_like(x, jnp.nan)  # noqa: E731
    for t in TIMES:
        x, tt, y = points(sde, t, key=4)
        c, u = MIX.score_fn(sde, y), MIX.score_fn(sde)
        full = guidance.cfg(sde, c, u, w, interval=(0.0, 1e6))(x, tt)
        close(full, guidance.cfg(sde, c, u, w)(x, tt), float(jnp.abs(full).max()))
        none = jax.jit(lambda x: guidance.cfg(sde, c, nan_uncond, w, interval=(1e5, 1e6))(x, tt))(x)
        close(none, c(x, tt), float(jnp.abs(none).max()))  # jit vs eager: rounding only
    sig = float(guidance.edm_sigma(sde, jnp.array([0.5]))[0])
    x, tt, y = points(sde, 0.5, key=5)
    c, u = MIX.score_fn(sde, y), MIX.score_fn(sde)
    inside = guidance.cfg(sde, c, u, w, interval=(sig * 0.99, sig * 1.01))(x, tt)
    close(inside, guidance.cfg(sde, c, u, w)(x, tt), float(jnp.abs(inside).max()))
    outside = guidance.cfg(sde, c, u, w, interval=(sig * 1.01, sig * 2.0))(x, tt)
    close(outside, c(x, tt), float(jnp.abs(outside).max()))


def test_thresholds():
    """Static: x̂₀ of the transformed score is clip(x̂₀); dynamic: Imagen's rule s = max(1, q_p|x̂₀|),
    x̂₀' = clip(x̂₀, −s, s)/s per example, by numpy; both only move x̂₀ (x and t are unchanged)."""
    sde = SDES["vp"]
    x, tt, _ = points(sde, 0.3, key=6)
    a, s = sde.marginal_coeffs(tt)
    score = lambda x, t: 3.0 * MIX.score_fn(sde)(x, t) + 1.0  # noqa: E731  (x̂₀ well outside [-1, 1])
    x0 = np.asarray(convert(score(x, tt), "score", "x0", x, a, s), np.float64)
    static = convert(guidance.threshold(sde, score, -0.5, 1.0)(x, tt), "score", "x0", x, a, s)
    np.testing.assert_allclose(np.asarray(static), np.clip(x0, -0.5, 1.0), atol=2e-5)
    dyn = convert(guidance.threshold(sde, score, percentile=0.9)(x, tt), "score", "x0", x, a, s)
    q = np.maximum(np.quantile(np.abs(x0), 0.9, axis=-1, keepdims=True), 1.0)
    np.testing.assert_allclose(np.asarray(dyn), np.clip(x0, -q, q) / q, atol=2e-5)
    assert np.all(np.abs(np.asarray(dyn)) <= 1.0 + 1e-6)
    for bad, match in [(dict(lo=1.0, hi=0.0), "lo < hi"), (dict(percentile=1.5), "percentile")]:
        with pytest.raises(ValueError, match=match):
            guidance.threshold(sde, score, **bad)


def test_bad_guidance_arguments():
    sde = SDES["vp"]
    c = MIX.score_fn(sde)
    for kwargs, match in [(dict(space="logits"), "unknown rescale space"), (dict(rescale=2.0), "rescale"),
                          (dict(interval=(1.0, 0.5)), "interval")]:
        with pytest.raises(ValueError, match=match):
            guidance.cfg(sde, c, c, 1.0, **kwargs)
    with pytest.raises(ValueError, match="y must be integer classes"):
        guidance.classifier_guidance(c, MIX.classifier_fn(sde), jnp.zeros((4,)), 1.0)
    with pytest.raises(ValueError, match=r"y must lie in \[0, 3\)"):
        MIX.score_fn(sde, jnp.array([0, 3]))(jnp.zeros((2, 2)), jnp.ones((2,)))


# --- guided sampling puts the samples in the right component ------------------------------------
N = 4000
RUNS = {  # (sde, method, options): VE with PC, VP with DDIM, and a fast solver (DPM-Solver++ 2M) on VP
    "ve_pc": ("ve", "pc", dict(corrector="none")),
    "vp_ddim": ("vp", "ddim", dict(num_steps=200)),
    "vp_dpm_solver": ("vp", "dpm_solver", dict(num_steps=30, order=2)),
}


@pytest.mark.parametrize("run", list(RUNS))
def test_guided_sampling_lands_in_the_class(run):
    """Samples of class y = 1 by CFG(w = 0) and by exact classifier guidance (γ = 1): fraction assigned
    to component 1 by the exact posterior ≥ 99 % (the components overlap by < 1e-4), mean and covariance
    of component 1 within 4 standard errors plus the solver's discretisation bias. The bias allowance
    (0.02 on the mean, 0.03 on the covariance) bounds the solvers' unconditional W2 error at these step
    counts on this scale (experiments/bench_solvers.py: < 1e-2 for 200-step DDIM, 30-step 2M)."""
    name, method, options = RUNS[run]
    sde = SDES[name]
    y = jnp.ones((N,), jnp.int32)
    mean, cov = np.asarray(MIX.means[1]), np.asarray(MIX.covs[1])
    for score in (guidance.cfg(sde, MIX.score_fn(sde, y), MIX.score_fn(sde), 0.0),
                  guidance.classifier_guidance(MIX.score_fn(sde), MIX.classifier_fn(sde), y, 1.0)):
        x, _ = methods.sample(method, jax.random.PRNGKey(11), sde, score, (N, 2), **options)
        x = np.asarray(x, np.float64)
        cls = np.asarray(jnp.argmax(MIX.log_posterior(sde, jnp.asarray(x, jnp.float32), jnp.full((N,), sde.t_min)),
                                    -1))
        assert np.mean(cls == 1) >= 0.99, (run, np.mean(cls == 1))
        se_mean = np.sqrt(np.diag(cov) / N)
        np.testing.assert_array_less(np.abs(x.mean(0) - mean), 4 * se_mean + 0.02)
        se_cov = np.sqrt((cov**2 + np.outer(np.diag(cov), np.diag(cov))) / N)
        np.testing.assert_array_less(np.abs(np.cov(x.T) - cov), 4 * se_cov + 0.03)


def test_larger_weight_sharpens_the_class():
    """CFG with w > 0 samples p(x|y)·p(y|x)^w: more mass assigned to y than w = 0 when classes overlap."""
    mix = GaussianMixture.create([0.5, 0.5], [[-0.5, 0.0], [0.5, 0.0]], std=0.5)
    sde, y = SDES["vp"], jnp.ones((N,), jnp.int32)
    frac = []
    for w in (0.0, 3.0):
        score = guidance.cfg(sde, mix.score_fn(sde, y), mix.score_fn(sde), w)
        x, _ = methods.sample("dpm_solver", jax.random.PRNGKey(3), sde, score, (N, 2), num_steps=30, order=2)
        frac.append(float(jnp.mean(jnp.argmax(mix.log_posterior(sde, x, jnp.full((N,), sde.t_min)), -1) == 1)))
    # w = 0: P(posterior says 1 | x ~ component 1) = Φ(0.5/0.5 · 1)... = Φ(1) ≈ 0.841 (± 0.006 at N = 4000)
    assert abs(frac[0] - 0.8413) < 4 * np.sqrt(0.84 * 0.16 / N) + 0.01, frac
    assert frac[1] > frac[0] + 0.05, frac
