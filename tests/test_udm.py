"""The unified diffusion model (`sdejax.udm`) and its degradations (`sdejax.degradations`) against exact answers.

Oracles:
- gaussian(sde) with the exact Tweedie x̂_0 of Gaussian data: "deterministic" is DDIM η = 0 and "interp"
  with η is DDIM η on the same grid, x_T and noise draws (the loop's keys), to float64 rounding (1e-10 is
  10⁶ ulp but 10⁻³ of float32's ulp: a float32 leak or a different formula fails);
- D(x, t) = x + t e: Algorithm 2 ("cold_improved") recovers x_0 for any restorer; with the restorer
  x_t − t e + b, Algorithm 1 ("cold_naive") ends at x_0 + (n − 1) b exactly (the bias accumulates);
- blur: every tap row sums to 1, the blur matrix is doubly stochastic (half-sample symmetric boundary),
  so constants and means are kept; σ = 0 is the identity; it equals a dense numpy definition;
- mask: the masked fraction is round(tP)/P (within 1/(2P) of t), masks nest in t, the rest is unchanged;
- loss: 0 at the exact restorer, t² mean(e²) for the identity network; the cross-entropy equals a numpy
  computation; per-example draws depend only on the global index (sharding invariance).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

from gaussian_oracle import EPS, GAUSSIANS, SDES, gaussian_score
from sdejax import degradations as D
from sdejax.sampling.ddim import ddim_sample
from sdejax.score import tweedie_x0
from sdejax.udm import RULES, udm_loss, udm_sample

ROUNDING = 1e-10  # float64 (module docstring)
RS = np.random.RandomState(0)  # test data from numpy: each jax.random shape would cost a compile


def _tweedie(sde, score, x, t):
    return tweedie_x0(sde, score, x, t)


@pytest.mark.parametrize("kind,eta", [("vp", 0.5), ("ve", 1.0)])
def test_gaussian_is_ddim(kind, eta):
    """Same grid, x_T and keys (udm gets the loop's half of ddim_sample's split): equal to rounding."""
    with jax.enable_x64(True):
        sde = SDES[kind](100)
        score = gaussian_score(sde, *GAUSSIANS[2], dtype=jnp.float64)
        x0_fn = Partial(_tweedie, sde, score)
        key = jax.random.PRNGKey(3)
        x_T = jnp.asarray(sde.prior_std * RS.randn(64, 2))
        ts = np.linspace(sde.T, EPS, 12)
        loop_key = jax.random.split(key)[1]
        for rule, e in (("deterministic", 0.0), ("interp", 0.0), ("interp", eta)):
            ref, nfe_ref = ddim_sample(key, sde, score, x_T.shape, ts=ts, x_T=x_T, eta=e)
            out, nfe = udm_sample(loop_key, D.gaussian(sde), x0_fn, x_T, ts, rule=rule, eta=e)
            err = float(jnp.max(jnp.abs(out - ref)) / jnp.max(jnp.abs(ref)))
            print(f"{kind} {rule} eta={e}: max rel diff {err:.2e}")
            assert out.dtype == jnp.float64 and nfe == nfe_ref == 12
            assert err < ROUNDING


def test_gaussian_fresh_step_and_keys():
    """One "fresh" step on a 2-point grid: x_s = α_s x̂_0 + σ_s z with z from fold_in(rng, 0)."""
    with jax.enable_x64(True):
        sde = SDES["vp"](100)
        score = gaussian_score(sde, *GAUSSIANS[2], dtype=jnp.float64)
        x0_fn = Partial(_tweedie, sde, score)
        x_T = jnp.asarray(RS.randn(8, 2))
        rng = jax.random.PRNGKey(5)
        out, nfe = udm_sample(rng, D.gaussian(sde), x0_fn, x_T, [0.8, 0.3], rule="fresh", denoise=False)
        (a,), (s,) = sde.marginal_coeffs(jnp.array([0.3], jnp.float64))
        x0 = x0_fn(x_T, jnp.full((8,), 0.8, jnp.float64))
        want = a * x0 + s * jax.random.normal(jax.random.fold_in(rng, 0), x_T.shape, jnp.float64)
        assert nfe == 1
        np.testing.assert_allclose(out, want, rtol=0, atol=ROUNDING)


def _garbage(w, x, t):
    return 3.0 * jnp.tanh(x @ w) + t[:, None]


def _biased(e, b, x, t):
    return x - t[:, None] * e + b


def test_cold_linear_improved_exact_naive_not():
    with jax.enable_x64(True):
        e, x0, k3 = jnp.asarray(RS.randn(3)), jnp.asarray(RS.randn(6, 3)), jax.random.PRNGKey(0)
        deg, n, b = D.linear(e), 9, 0.3
        ts = np.linspace(1.0, 0.0, n)
        x_T = deg.apply(x0, None, jnp.ones(6, jnp.float64))
        garbage = Partial(_garbage, jnp.asarray(RS.randn(3, 3)))
        biased = Partial(_biased, e, b)
        for r in (garbage, biased):
            out, nfe = udm_sample(k3, deg, r, x_T, ts, rule="cold_improved", denoise=False)
            err = float(jnp.max(jnp.abs(out - x0)))
            print(f"cold_improved, restorer {r.func.__name__}: max |x - x0| = {err:.2e}")
            assert nfe == n - 1 and err < ROUNDING
        naive, _ = udm_sample(k3, deg, biased, x_T, ts, rule="cold_naive", denoise=False)
        drift = float(jnp.max(jnp.abs(naive - x0 - (n - 1) * b)))
        print(f"cold_naive, biased restorer: max |x - x0 - (n-1) b| = {drift:.2e}")
        np.testing.assert_allclose(naive, x0 + (n - 1) * b, rtol=0, atol=ROUNDING)


def _dense_blur(x, sigmas, r):
    """Direct definition, numpy loops: y[i] = Σ_k w_k x[refl(i + k)] per spatial axis, w ∝ exp(−k²/2σ²)."""
    def refl(i, n):
        i = i % (2 * n)
        return i if i < n else 2 * n - 1 - i

    out = np.array(x, np.float64)
    for b, sig in enumerate(sigmas):
        k = np.arange(-r, r + 1)
        w = np.exp(-0.5 * (k / sig) ** 2) if sig > 0 else (k == 0).astype(float)
        w /= w.sum()
        for axis in (1, 2):
            img = np.moveaxis(out[b], axis - 1, 0)
            n = img.shape[0]
            y = np.zeros_like(img)
            for i in range(n):
                for kk, wk in zip(k, w):
                    y[i] += wk * img[refl(i + kk, n)]
            out[b] = np.moveaxis(y, 0, axis - 1)
    return out


def test_blur():
    with jax.enable_x64(True):
        deg = D.blur(1.5)  # radius 6 > W = 5: the boundary reflects more than once
        t = jnp.array([0.0, 0.3, 1.0])
        x = jnp.asarray(RS.randn(3, 6, 5, 2))
        np.testing.assert_allclose(jnp.sum(deg.kernel(t), -1), 1.0, rtol=0, atol=1e-15)
        m = deg.matrix(t, 5)
        col = float(jnp.max(jnp.abs(jnp.sum(m, axis=1) - 1.0)))
        assert float(jnp.max(jnp.abs(jnp.sum(m, axis=2) - 1.0))) < 1e-15 and col < 1e-15
        y = deg.apply(x, None, t)
        dense = float(np.max(np.abs(np.asarray(y) - _dense_blur(x, np.asarray(deg.sigma(t)), deg.radius))))
        mean = float(jnp.max(jnp.abs(jnp.mean(y, (1, 2)) - jnp.mean(x, (1, 2)))))
        const = float(jnp.max(jnp.abs(deg.apply(jnp.full_like(x, 2.5), None, t) - 2.5)))
        print(f"blur: column sums {col:.1e}, vs dense {dense:.1e}, mean {mean:.1e}, constant {const:.1e}")
        assert dense < 1e-13 and mean < 1e-14 and const < 1e-14
        assert np.array_equal(y[0], x[0])  # σ(0) = 0: the identity
        assert float(deg.sigma(jnp.ones(1))[0]) == 1.5
        # with the true x_0 as restorer both cold rules end at x_0 (blur of t = 0 is the identity)
        x0_fn = Partial(lambda data, x, t: data, x)
        for rule in ("cold_naive", "cold_improved"):
            out, _ = udm_sample(jax.random.PRNGKey(1), deg, x0_fn, deg.apply(x, None, jnp.ones(3)),
                                np.linspace(1.0, 0.0, 5), rule=rule, denoise=False)
            assert float(jnp.max(jnp.abs(out - x))) < ROUNDING


def test_mask_fraction_nesting_and_tokens():
    deg = D.mask(fill=-1.0, event_ndim=1, seed=3)
    x = jnp.asarray(RS.rand(41, 4, 5, 2), jnp.float32)  # P = 20 pixels of 2 channels
    t = jnp.linspace(0.0, 1.0, 41)
    hidden = np.asarray(deg.masked(t, x.shape))[..., 0]
    frac = hidden.reshape(41, -1).mean(-1)
    print(f"mask: max |fraction - t| = {np.max(np.abs(frac - np.asarray(t))):.3f} (bound 1/(2P) = 0.025)")
    assert np.max(np.abs(frac - np.asarray(t))) <= 0.5 / 20 + 1e-7
    assert np.all(hidden[:-1] <= hidden[1:])  # nested: masked at t stays masked at t' > t
    y = np.asarray(deg.apply(x, None, t))
    keep = ~hidden[..., None].repeat(2, -1)
    assert np.array_equal(y[keep], np.asarray(x)[keep]) and np.all(y[~keep] == -1.0)
    tokens = jnp.asarray(RS.randint(0, 7, (2, 10)), jnp.int32)
    z = D.mask(fill=7, event_ndim=0).apply(tokens, None, jnp.array([0.0, 0.5]))
    assert z.dtype == tokens.dtype and np.array_equal(z[0], tokens[0]) and int(jnp.sum(z[1] == 7)) == 5


def _undo_linear(e, x_t, t, train, rng):
    return x_t - t[:, None] * e


def _identity_net(params, x_t, t, train, rng):
    return x_t


def test_mse_loss_zero_at_exact_restorer():
    with jax.enable_x64(True):
        e = jnp.array([1.0, -2.0, 0.5], jnp.float64)
        batch = {"x": jnp.asarray(RS.randn(16, 3))}
        loss, _ = jax.jit(udm_loss(_undo_linear, D.linear(e)))(e, jax.random.PRNGKey(1), batch)
        print(f"mse at the exact restorer: {float(loss):.1e}")
        assert float(loss) < 1e-28
        _, aux = jax.jit(udm_loss(_identity_net, D.linear(e)))(None, jax.random.PRNGKey(1), batch)
        np.testing.assert_allclose(aux["losses"], aux["t"] ** 2 * float(jnp.mean(e**2)), rtol=1e-12)
        assert float(jnp.min(aux["t"])) >= 0.0 and float(jnp.max(aux["t"])) <= 1.0


def _table_net(table, z, t, train, rng):
    return table[z]


def test_xent_loss_by_hand():
    b, d, k = 4, 6, 5
    deg = D.mask(fill=k, event_ndim=0, seed=2)
    table = jnp.asarray(RS.randn(k + 1, k), jnp.float32)
    x = jnp.asarray(RS.randint(0, k, (b, d)), jnp.int32)
    loss_fn = jax.jit(udm_loss(_table_net, deg, kind="xent", t_sampling="golden"))
    loss, aux = loss_fn(table, jax.random.PRNGKey(2), {"x": x})
    rank = np.empty(d, int)
    rank[np.random.default_rng(2).permutation(d)] = np.arange(d)
    t = np.asarray(aux["t"], np.float64)
    z = np.where(rank[None] < np.round(t * d)[:, None], k, np.asarray(x))
    logits = np.asarray(table, np.float64)[z]
    logp = logits - np.log(np.sum(np.exp(logits), -1, keepdims=True))
    want = -np.take_along_axis(logp, np.asarray(x)[..., None], -1)[..., 0].mean(-1)
    print(f"xent: max rel diff to numpy {np.max(np.abs(np.asarray(aux['losses']) / want - 1)):.1e}")
    np.testing.assert_allclose(aux["losses"], want, rtol=1e-5)
    np.testing.assert_allclose(loss, want.mean(), rtol=1e-5)


def _scale_net(p, x_t, t, train, rng):
    return p * x_t


def test_loss_draws_follow_the_global_index():
    loss_fn = jax.jit(udm_loss(_scale_net, D.gaussian(SDES["vp"](100)), t_sampling="uniform"))
    x = jnp.asarray(RS.randn(8, 2, 2, 1), jnp.float32)
    rng = jax.random.PRNGKey(4)
    _, full = loss_fn(0.9, rng, {"x": x})
    halves = [loss_fn(0.9, rng, {"x": x[i:i + 4], "index": jnp.arange(i, i + 4)})[1] for i in (0, 4)]
    np.testing.assert_array_equal(full["t"], jnp.concatenate([h["t"] for h in halves]))
    np.testing.assert_allclose(full["losses"], jnp.concatenate([h["losses"] for h in halves]), rtol=1e-6)


TRACES = [0]


def _traced_once(w, x, t):
    TRACES[0] += 1
    return x * w


def test_compiled_once_for_new_parameters():
    deg, x = D.linear(jnp.ones(2)), jnp.zeros((3, 2))
    for w in (0.5, 0.7):
        udm_sample(jax.random.PRNGKey(0), deg, Partial(_traced_once, jnp.float32(w)), x, [1.0, 0.5, 0.0],
                   rule="cold_improved")
    assert TRACES[0] == 2  # one trace of the scan body and one of the final x̂_0, for both parameter values


def test_bad_inputs():
    x, ts, f = jnp.zeros((2, 3)), [1.0, 0.0], Partial(lambda x, t: x)
    with pytest.raises(ValueError, match="unknown UDM rule 'ddpm'.*" + ".*".join(RULES)):
        udm_sample(jax.random.PRNGKey(0), D.mask(), f, x, ts, rule="ddpm")
    with pytest.raises(ValueError, match="strictly decreasing; ts\\[0\\]"):
        udm_sample(jax.random.PRNGKey(0), D.mask(), f, x, [0.0, 1.0], rule="cold_naive")
    with pytest.raises(ValueError, match="lie in \\[t_min, T\\]"):
        udm_sample(jax.random.PRNGKey(0), D.mask(), f, x, [2.0, 0.0], rule="cold_naive")
    for deg, rule in ((D.blur(1.0), "deterministic"), (D.mask(), "interp")):
        with pytest.raises(ValueError, match=f"rule '{rule}'.*the '{deg.name}' degradation has no inverse"):
            udm_sample(jax.random.PRNGKey(0), deg, f, x, ts, rule=rule)
    with pytest.raises(ValueError, match="only read by rule 'interp'"):
        udm_sample(jax.random.PRNGKey(0), D.mask(), f, x, ts, rule="cold_naive", eta=0.5)
    with pytest.raises(ValueError, match="eta must be in"):
        udm_sample(jax.random.PRNGKey(0), D.gaussian(SDES["vp"](10)), f, x, [0.5, 0.1], rule="interp", eta=1.5)
    with pytest.raises(ValueError, match="unknown UDM loss kind 'l1'; valid: \\['mse', 'xent'\\]"):
        udm_loss(_identity_net, D.mask(), kind="l1")
    with pytest.raises(ValueError, match="unknown t_sampling"):
        udm_loss(_identity_net, D.mask(), t_sampling="sobol")
    with pytest.raises(ValueError, match="'xent' needs integer tokens"):
        udm_loss(_identity_net, D.mask(), kind="xent")(None, jax.random.PRNGKey(0), {"x": x})
    with pytest.raises(ValueError, match="unknown schedule 'cosine'; valid"):
        D.blur(1.0, schedule="cosine")
    with pytest.raises(ValueError, match=r"degradation 'snow'; valid: \['blur', 'gaussian', 'linear', 'mask'\]"):
        D.get_degradation("snow")
