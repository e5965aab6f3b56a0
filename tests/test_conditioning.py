"""Class labels through the losses (label dropout for classifier-free guidance) and the score function.

Oracle: for the class-conditional mixture the DSM loss decomposes as L(f) = E λ‖f − s_c‖² + C with C
independent of f, so the loss of the exact unconditional score exceeds that of the exact conditional
one by exactly E λ‖s_u − s_c‖², which is estimated independently.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from sdejax import losses, score
from sdejax.analytic import GaussianMixture
from sdejax.models import registry
from sdejax.sampling import methods
from sdejax.sde import VPSDE

MIX = GaussianMixture.create([0.5, 0.5], [[-1.0, 0.0], [1.0, 0.5]], std=0.6)
SDE = VPSDE()
N = 20_000


def exact_apply_fn(mode: str):
    """A "network" returning the exact score: conditional on y, unconditional for the null class 2
    (mode "cond"), or always unconditional (mode "uncond", a network that ignores its labels)."""

    def apply_fn(params, x, labels, *, train=False, rng=None, y=None):
        t = labels * SDE.T / 999.0
        uncond = MIX.marginal_score(SDE, x, t)
        if mode == "uncond":
            return uncond
        cond = MIX.marginal_score(SDE, x, t, jnp.minimum(y, 1))
        return jnp.where((y == 2)[:, None], uncond, cond)

    return apply_fn


def data(key=0):
    k1, k2 = jax.random.split(jax.random.PRNGKey(key))
    y = jax.random.randint(k1, (N,), 0, 2)
    x = MIX.means[y] + 0.6 * jax.random.normal(k2, (N, 2))
    return {"x": x, "y": y}


def per_example(mode, p_uncond=0.0, num_classes=2, key=1, batch=None):
    fn = losses.get_sde_loss_fn(SDE, exact_apply_fn(mode), train=False, prediction="score", eps=1e-3,
                                num_classes=num_classes, p_uncond=p_uncond)
    return np.asarray(jax.jit(lambda b: fn(None, jax.random.PRNGKey(key), b)[1]["losses"])(batch or data()), np.float64)


def test_conditional_dsm_decomposition():
    """L(s_u) − L(s_c) (same t, z per example) = E σ² mean_d‖s_u − s_c‖² (the plain score-space weight),
    estimated from fresh draws: the two agree within 4 combined standard errors, and the difference is
    > 10 of its standard errors from zero (the loss sees the labels)."""
    b = data()
    d = per_example("uncond", batch=b) - per_example("cond", batch=b)
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(5), 3)
    t = 1e-3 + jax.random.uniform(k1, (N,)) * (SDE.T - 1e-3)
    alpha, sigma = SDE.marginal_coeffs(t)
    x0 = data(7)
    xt = alpha[:, None] * x0["x"] + sigma[:, None] * jax.random.normal(k2, (N, 2))
    gap = MIX.marginal_score(SDE, xt, t) - MIX.marginal_score(SDE, xt, t, x0["y"])
    r = np.asarray(sigma**2 * jnp.mean(gap**2, -1), np.float64)
    se = np.sqrt(d.var() / N + r.var() / N)
    assert abs(d.mean() - r.mean()) < 4 * se, (d.mean(), r.mean(), se)
    assert d.mean() > 10 * d.std() / np.sqrt(N)


def test_label_dropout():
    """p_uncond = 1 is exactly the unconditional loss (every label is the null class); p_uncond = 0.3
    drops a Binomial(N, 0.3) share of labels (identified per example: the dropped examples' losses equal
    the unconditional ones, the others the conditional ones)."""
    b = data()
    cond, uncond = per_example("cond", batch=b), per_example("uncond", batch=b)
    np.testing.assert_array_equal(per_example("cond", p_uncond=1.0, batch=b), uncond)
    mixed = per_example("cond", p_uncond=0.3, batch=b)
    differs = ~np.isclose(cond, uncond, rtol=1e-6, atol=1e-7)
    dropped = np.isclose(mixed, uncond, rtol=1e-6, atol=1e-7) & differs
    kept = np.isclose(mixed, cond, rtol=1e-6, atol=1e-7) & differs
    assert np.all((dropped | kept)[differs])
    rate = dropped.sum() / differs.sum()
    assert abs(rate - 0.3) < 4 * np.sqrt(0.21 / differs.sum()), rate


def test_bad_conditioning():
    with pytest.raises(ValueError, match="needs batch\\['y'\\]"):
        per_example("cond", batch={"x": jnp.zeros((4, 2))})
    with pytest.raises(ValueError, match="p_uncond"):
        losses.get_sde_loss_fn(SDE, exact_apply_fn("cond"), False, p_uncond=0.1)
    with pytest.raises(ValueError, match="p_uncond"):
        losses.get_ddpm_loss_fn(SDE, exact_apply_fn("cond"), False, num_classes=2, p_uncond=1.5)
    fn = losses.get_sde_loss_fn(SDE, exact_apply_fn("cond"), False, num_classes=2)
    with pytest.raises(ValueError, match=r"batch\['y'\] must lie in \[0, 2\)"):  # checked outside jit
        fn(None, jax.random.PRNGKey(0), {"x": jnp.zeros((2, 2)), "y": jnp.array([0, 2])})


def test_network_score_carries_labels_as_leaves():
    """get_score_fn(..., y) puts y among the Partial's leaves: one compiled sampler serves every label
    vector, and a class-conditional network's score depends on y (null class = y None)."""
    config = ml_collections.ConfigDict({
        "data": {"image_size": 8, "num_channels": 1, "centered": True},
        "model": {"name": "ddpm", "nf": 32, "ch_mult": (1,), "num_res_blocks": 1, "attn_resolutions": (),
                  "dropout": 0.0, "resamp_with_conv": True, "conditional": True, "nonlinearity": "swish",
                  "sigma_min": 0.01, "sigma_max": 50.0, "num_scales": 1000, "num_classes": 3, "scale_by_sigma": False},
    })
    # rbg: XLA:CPU compiles threefry's initialisers slowly; the init values play no part in the oracle.
    model, variables = registry.init_model(config, jax.random.key(0, impl="rbg"))
    leaves, tree = jax.tree_util.tree_flatten(variables)  # away from the near-zero output init
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    variables = jax.tree_util.tree_unflatten(tree, [v + 0.2 * jax.random.normal(k, v.shape) for v, k in zip(leaves, keys)])
    apply_fn = registry.make_apply_fn(model)
    x, t = jax.random.normal(jax.random.PRNGKey(2), (4, 8, 8, 1)), jnp.full((4,), 0.5)
    outs = {}
    for name, y in {"a": jnp.array([0, 1, 2, 0]), "b": jnp.array([2, 2, 1, 0]), "null": None}.items():
        fn = score.get_score_fn(SDE, apply_fn, variables, y=y)
        assert (y is None) or any(leaf is y for leaf in jax.tree_util.tree_leaves(fn))
        outs[name] = np.asarray(fn(x, t))
    assert not np.allclose(outs["a"][:2], outs["b"][:2])  # examples 0, 1 have different classes
    np.testing.assert_allclose(outs["a"][3], outs["b"][3], rtol=1e-5, atol=1e-6)  # both class 0
    null = score.get_score_fn(SDE, apply_fn, variables, y=jnp.full((4,), 3))(x, t)  # index 3 = the null class
    np.testing.assert_allclose(outs["null"], np.asarray(null), rtol=1e-5, atol=1e-6)
    traces = []
    sample = jax.jit(lambda fn, rng: (traces.append(1), methods.sample("ddim", rng, SDE, fn, (4, 8, 8, 1),
                                                                      num_steps=3))[1][0])
    for y in (jnp.array([0, 1, 2, 0]), jnp.array([1, 1, 1, 1])):
        sample(score.get_score_fn(SDE, apply_fn, variables, y=y), jax.random.PRNGKey(0))
    assert len(traces) == 1
