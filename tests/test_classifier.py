"""Noise-conditional classifiers against the one-component-per-class Gaussian mixture, whose exact
posterior p_t(y | x_t) = w_y N_y,t(x) / Σ_k w_k N_k,t(x) is known at every t under every linear SDE.

(i) The cross-entropy is minimised by the exact posterior: for logits c · log p_t(· | x_t), the
per-example derivative at c = 1 is −ℓ_y + Σ_k p_k ℓ_k, whose mean over y ~ p_t(y | x_t) is exactly 0;
the expected loss is convex in c, so at c = 0.5 the derivative is negative.
(ii) A trained MLP classifier's accuracy by noise level matches the Bayes classifier's.
(iii) Guidance by the trained classifier moves samples into the class.
(iv) The network families build; WRN-28-10's parameter count equals the closed-form count.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from sdejax import classifier as clf
from sdejax.analytic import GaussianMixture
from sdejax.guidance import classifier_guidance
from sdejax.losses import get_sde_loss_fn
from sdejax.models import classifier as nets
from sdejax.models.registry import count_params
from sdejax.sampling import methods
from sdejax.sde import VESDE, VPSDE

WEIGHTS = np.array([0.45, 0.35, 0.2])
MEANS = np.array([[-1.0, 0.0], [1.0, 0.0], [0.0, 1.5]])
COVS = np.array([[[0.5, 0.1], [0.1, 0.3]], [[0.3, 0.0], [0.0, 0.5]], [[0.4, -0.1], [-0.1, 0.3]]])
MIX = GaussianMixture.create(WEIGHTS, MEANS, COVS)
SDES = {"vp": VPSDE(), "ve": VESDE(sigma_max=10.0)}


def labelled(key: int, n: int) -> tuple[jax.Array, jax.Array]:
    """(x_0, y) from the mixture: y ~ w, x_0 ~ N(μ_y, Σ_y)."""
    k1, k2 = jax.random.split(jax.random.PRNGKey(key))
    y = jax.random.choice(k1, 3, (n,), p=jnp.asarray(WEIGHTS, jnp.float32))
    chol = jnp.asarray(np.linalg.cholesky(COVS), jnp.float32)
    x = jnp.asarray(MEANS, jnp.float32)[y] + jnp.einsum("nij,nj->ni", chol[y], jax.random.normal(k2, (n, 2)))
    return x, y.astype(jnp.int32)


def oracle_apply_fn(sde, labels: str, sigma_data):
    """apply_fn(c, x_in, c_noise) = c · log p_t(· | x): t recovered from the labels (999 t or σ_t) and
    x from x_in = c_in x, so it is the exact posterior read through the classifier's input convention."""

    def apply_fn(c, x_in, c_noise, *, train=False, rng=None):
        del train, rng
        t = c_noise * sde.T / 999.0 if labels == "time" else sde.t_from_log_snr(-2.0 * jnp.log(c_noise))
        alpha, sigma = sde.marginal_coeffs(t)
        x = x_in if sigma_data is None else x_in * jnp.sqrt((alpha * sigma_data) ** 2 + sigma**2)[:, None]
        return c * MIX.log_posterior(sde, x, t)

    return apply_fn


ORACLE_CASES = {"vp": ("time", 1.0), "ve": ("sigma", None)}


@pytest.mark.parametrize("name", list(SDES))
def test_exact_posterior_minimises_the_cross_entropy(name):
    """Mean per-example dL/dc at c = 1 within 4 SE of 0; at c = 0.5 below −10 SE (n = 8192)."""
    sde, (labels, sigma_data) = SDES[name], ORACLE_CASES[name]
    loss_fn = clf.get_classifier_loss_fn(sde, oracle_apply_fn(sde, labels, sigma_data), False, labels=labels,
                                         sigma_data=sigma_data)
    x, y = labelled(0, 8192)
    batch = {"x": x, "y": y}
    per_example = jax.jit(jax.jacfwd(lambda c: loss_fn(c, jax.random.PRNGKey(1), batch)[1]["losses"]))
    stats = {}
    for c in (1.0, 0.5):
        g = np.asarray(per_example(jnp.float32(c)), np.float64)
        stats[c] = (g.mean(), g.std(ddof=1) / np.sqrt(g.size))
    print(name, {c: f"{m:.5f} ± {s:.5f}" for c, (m, s) in stats.items()})
    assert abs(stats[1.0][0]) < 4 * stats[1.0][1], stats
    assert stats[0.5][0] < -10 * stats[0.5][1], stats


def test_loss_times_and_index_match_the_score_loss():
    """Same t as the DSM loss for the same key and batch (guidance reads the classifier at the sampler's
    t in the score model's convention); per-example draws follow batch['index'] (shards = the batch)."""
    sde = SDES["vp"]
    x, y = labelled(2, 16)
    rng = jax.random.PRNGKey(3)
    apply_fn = oracle_apply_fn(sde, "time", 1.0)
    loss_fn = clf.get_classifier_loss_fn(sde, apply_fn, False)
    aux = jax.jit(lambda batch: loss_fn(1.0, rng, batch)[1])
    full = aux({"x": x, "y": y})
    dsm = jax.jit(get_sde_loss_fn(sde, lambda p, x, t, **k: x, False))(None, rng, {"x": x})[1]
    np.testing.assert_array_equal(np.asarray(full["t"]), np.asarray(dsm["t"]))
    half = aux({"x": x[8:], "y": y[8:], "index": jnp.arange(8, 16)})
    np.testing.assert_allclose(np.asarray(half["losses"]), np.asarray(full["losses"][8:]), rtol=1e-6)
    with pytest.raises(ValueError, match="batch\\['y'\\]"):
        loss_fn(1.0, rng, {"x": x})
    with pytest.raises(ValueError, match="unknown noise labels"):
        clf.get_classifier_loss_fn(sde, apply_fn, False, labels="nope")


@pytest.mark.parametrize("name", list(SDES))
def test_guidance_by_the_exact_classifier_is_the_conditional_score(name):
    """classifier_guidance(s, classifier_log_prob_fn(oracle), y, 1) = ∇ log p_t(x | y) to rounding: the
    log-prob function reads the network at (c_in x_t, c_noise(t)) and differentiates through c_in."""
    sde, (labels, sigma_data) = SDES[name], ORACLE_CASES[name]
    log_prob = clf.classifier_log_prob_fn(sde, oracle_apply_fn(sde, labels, sigma_data), jnp.float32(1.0),
                                          labels=labels, sigma_data=sigma_data)
    x0, y = labelled(4, 64)
    t = jnp.linspace(0.05, 1.0, 64)
    alpha, sigma = sde.marginal_coeffs(t)
    x = alpha[:, None] * x0 + sigma[:, None] * jax.random.normal(jax.random.PRNGKey(5), x0.shape)
    guided, exact = jax.jit(lambda x, t: (classifier_guidance(MIX.score_fn(sde), log_prob, y, 1.0)(x, t),
                                          MIX.score_fn(sde, y)(x, t)))(x, t)
    scale = np.abs(np.asarray(exact)).max()
    np.testing.assert_allclose(np.asarray(guided), np.asarray(exact), rtol=0, atol=1e-4 * scale)


# (ii), (iii): a trained MLP classifier ------------------------------------------------------------------

TIMES = (0.05, 0.2, 0.4, 0.6, 0.8)
N_EVAL = 20_000
TRAIN_GAP = 0.02  # allowance for a few hundred optimizer steps of a small network


@pytest.fixture(scope="module")
def trained():
    """MLP classifier (nf=64, depth=2, positional embedding of 999 t) trained for 400 Adam steps on the VP
    perturbed mixture with batch 512."""
    sde = SDES["vp"]
    config = ml_collections.ConfigDict({"classifier": {"name": "mlp", "nf": 64, "depth": 2, "num_classes": 3}})
    apply_fn, params = nets.build_classifier(config, jax.random.key(0, impl="rbg"), jnp.zeros((1, 2)))
    loss_fn = clf.get_classifier_loss_fn(sde, apply_fn, True)
    tx = optax.adam(optax.cosine_decay_schedule(3e-3, 400, 0.1))

    @jax.jit
    def train(params):
        def step(carry, i):
            params, opt = carry
            x, y = labelled_traced(i)
            (loss, aux), g = jax.value_and_grad(loss_fn, has_aux=True)(params, jax.random.PRNGKey(i), {"x": x, "y": y})
            updates, opt = tx.update(g, opt, params)
            return (optax.apply_updates(params, updates), opt), loss
        (params, _), losses = jax.lax.scan(step, (params, tx.init(params)), jnp.arange(400))
        return params, losses

    params, losses = train(params)
    return sde, apply_fn, params, np.asarray(losses)


def labelled_traced(i):
    """512 labelled draws with key fold_in(100, i) (traceable in i)."""
    k1, k2 = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(100), i))
    y = jax.random.choice(k1, 3, (512,), p=jnp.asarray(WEIGHTS, jnp.float32)).astype(jnp.int32)
    chol = jnp.asarray(np.linalg.cholesky(COVS), jnp.float32)
    x = jnp.asarray(MEANS, jnp.float32)[y] + jnp.einsum("nij,nj->ni", chol[y], jax.random.normal(k2, (512, 2)))
    return x, y


def test_trained_classifier_matches_the_bayes_accuracy(trained):
    """At each t, |acc_trained − acc_Bayes| ≤ 4·SE + TRAIN_GAP and acc_trained ≤ acc_Bayes + 4·SE, with
    SE = sqrt(2 p(1 − p)/n) the standard error of a difference of two accuracies on n = 20000 points
    (conservative: both are scored on the same x_t, which only reduces the variance)."""
    sde, apply_fn, params, _ = trained
    x, y = labelled(7, N_EVAL)
    rng = jax.random.PRNGKey(8)
    acc = np.asarray(clf.accuracy_by_noise_level(sde, clf.classifier_log_prob_fn(sde, apply_fn, params), x, y,
                                                 TIMES, rng, batch_size=4096))
    bayes = np.asarray(clf.accuracy_by_noise_level(sde, MIX.classifier_fn(sde), x, y, TIMES, rng, batch_size=4096))
    se = np.sqrt(2 * bayes * (1 - bayes) / N_EVAL)
    print("t", TIMES, "\ntrained", np.round(acc, 4), "\nbayes  ", np.round(bayes, 4), "\n4SE", np.round(4 * se, 4))
    assert np.all(np.abs(acc - bayes) <= 4 * se + TRAIN_GAP), (acc, bayes)
    assert np.all(acc <= bayes + 4 * se), (acc, bayes)
    assert np.all(np.diff(bayes) < 0), bayes  # information decreases with noise


def test_trained_classifier_guidance_moves_samples_into_the_class(trained):
    """γ = 1 guidance of the exact unconditional score by the trained classifier towards y = 2 (weight
    0.2): the share of samples the exact posterior (at t_min) assigns to class 2 is far above the
    unguided share and close to the share for exact guidance, i.e. for samples of p(x | y = 2). Both
    references are taken on data drawn exactly (p_0 and p(x | y = 2)), as 30 steps of 2nd-order
    DPM-Solver sample the exactly guided mixture to < 1 % (test_guidance). Tolerance on the trained
    share: 4 SE of a difference of two shares at n = 2000 plus 0.05 for the trained gradient's error."""
    sde, apply_fn, params, _ = trained
    n = 2000
    y = jnp.full((n,), 2, jnp.int32)
    score = classifier_guidance(MIX.score_fn(sde), clf.classifier_log_prob_fn(sde, apply_fn, params), y, 1.0)
    guided, _ = methods.sample("dpm_solver", jax.random.PRNGKey(9), sde, score, (n, 2), num_steps=30, order=2)
    x0, y0 = labelled(10, 4 * n)
    share = lambda x: float(jnp.mean(jnp.argmax(MIX.log_posterior(sde, x, jnp.full(x.shape[:1], sde.t_min)), -1) == 2))  # noqa: E731
    shares = {"unguided": share(x0), "trained": share(guided), "exact": share(x0[np.asarray(y0) == 2])}
    print(shares)
    se = np.sqrt(0.25 / n)
    assert shares["trained"] > shares["unguided"] + 0.4, shares
    assert abs(shares["trained"] - shares["exact"]) < 4 * np.sqrt(2) * se + 0.05, shares


def test_log_prob_fn_compiles_once_for_new_params(trained):
    """Params are leaves of the Partial: a jitted consumer compiles once for two parameter sets."""
    sde, apply_fn, params, _ = trained
    f = jax.jit(lambda lp, x, t: lp(x, t))
    x, t = jnp.zeros((4, 2)), jnp.full((4,), 0.5)
    other = jax.tree_util.tree_map(lambda v: v * 1.01, params)
    a = f(clf.classifier_log_prob_fn(sde, apply_fn, params), x, t)
    b = f(clf.classifier_log_prob_fn(sde, apply_fn, other), x, t)
    assert a.shape == (4, 3) and not np.allclose(a, b)
    assert f._cache_size() == 1


# (iv) the network families ----------------------------------------------------------------------------

def cfg(**kw) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"classifier": kw})


@pytest.mark.parametrize("kw, shape", [
    (dict(name="mlp", nf=16, depth=1, num_classes=3), (4, 2)),
    (dict(name="conv", nf=8, depth=1, num_classes=10, dropout=0.1), (2, 16, 16, 1)),
    (dict(name="wideresnet", depth=10, widen=1, num_classes=10, dropout=0.1, embedding_size=32), (2, 32, 32, 3)),
])
def test_families_build_and_condition_on_noise(kw, shape):
    """Logits (B, K); they depend on the noise labels; dropout masks follow the rng in train mode."""
    # rbg keys: XLA:CPU compiles threefry initialisers slowly (22 s vs 5 s for the conv net here)
    apply_fn, variables = nets.build_classifier(cfg(**kw), jax.random.key(0, impl="rbg"), jnp.zeros(shape))
    x = jax.random.normal(jax.random.PRNGKey(1), shape)
    xx = jnp.concatenate([x, x])  # one network application per mode (two compiles in all)
    labels = jnp.concatenate([jnp.full(shape[:1], 0.5), jnp.full(shape[:1], 5.0)])

    @jax.jit
    def outputs(variables):
        return (apply_fn(variables, xx, labels),
                apply_fn(variables, xx, jnp.full_like(labels, 0.5), train=True, rng=jax.random.key(2, impl="rbg")))

    (logits, other), (a, b) = (jnp.split(v, 2) for v in outputs(variables))
    assert logits.shape == (shape[0], kw["num_classes"]) and np.all(np.isfinite(logits))
    assert not np.allclose(logits, other)  # the noise labels condition the logits
    if kw.get("dropout"):  # the same inputs under different dropout masks
        assert not np.allclose(a, b)
    else:
        np.testing.assert_allclose(a, logits, rtol=1e-5, atol=1e-5)


def wrn_count(depth: int, k: int, in_ch: int, classes: int, emb: int | None) -> int:
    """Closed-form parameters of WRN-depth-k: bias-free convs, two affine scalars per normalised
    channel, the classifier Dense; with a noise embedding of size E (temb 2E): E/2 frozen Fourier
    frequencies, Dense(E→2E), Dense(2E→2E) and a Dense(2E→C) per block."""
    n, widths = (depth - 4) // 6, [16 * k, 32 * k, 64 * k]
    total, c = 9 * in_ch * 16, 16
    for stage, w in enumerate(widths):
        for i in range(n):
            cin = c if i == 0 else w
            shortcut = i == 0 and (cin != w or stage > 0)  # 1x1 conv where the shape changes
            total += 2 * cin + 9 * cin * w + 2 * w + 9 * w * w + (cin * w if shortcut else 0)
            if emb:
                total += 2 * emb * w + w
        c = w
    total += 2 * c + c * classes + classes
    if emb:
        total += emb // 2 + (emb * 2 * emb + 2 * emb) + (4 * emb * emb + 2 * emb)
    return total


def test_wideresnet_28_10_parameter_count():
    """WRN-28-10 for CIFAR-10 by eval_shape (never compiled): without conditioning 36,479,194 = the
    standard WRN-28-10; with score_sde's conditioning (Fourier 128 frequencies, temb 512, a Dense per
    block) 2,692,608 more, 39,171,802 in all."""
    counts = {}
    for emb in ("none", "fourier"):
        shapes = nets.classifier_shapes(cfg(name="wideresnet", embedding=emb, embedding_size=256), (1, 32, 32, 3))
        counts[emb] = count_params(shapes)
    print(counts)
    assert counts["none"] == wrn_count(28, 10, 3, 10, None) == 36_479_194
    assert counts["fourier"] == wrn_count(28, 10, 3, 10, 256)


def test_config_errors():
    with pytest.raises(ValueError, match="unknown classifier.name 'resnet'; valid: \\['conv', 'mlp', 'wideresnet'\\]"):
        nets.get_classifier(cfg(name="resnet"))
    with pytest.raises(ValueError, match="unknown classifier key\\(s\\) \\['widen'\\]"):
        nets.get_classifier(cfg(name="mlp", widen=2))
    with pytest.raises(ValueError, match="6n \\+ 4"):
        nets.get_classifier(cfg(name="wideresnet", depth=27))
    with pytest.raises(ValueError, match="unknown classifier embedding"):
        nets.get_classifier(cfg(name="conv", embedding="sinus"))
    with pytest.raises(ValueError, match="num_classes"):
        nets.get_classifier(cfg(name="mlp", num_classes=1))
    assert set(nets.default_config("conv").keys()) == nets.CLASSIFIERS["conv"].keys
