"""Autoencoders: the β-VAE objective, the linear VAE against its PPCA / β-PPCA closed form, VQ-VAE quantisation,
straight-through and codebook learning (gradient and EMA), and the convolutional KL/VQ autoencoders' shapes."""
import functools
import math

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sdejax import autoencoders as ae
from sdejax.models.autoencoder import VAE, KLAutoencoder, LinearVAE, VQAutoencoder
from sdejax.models.registry import count_params

D, Q, N = 5, 2, 2000
LAM_POP = np.array([8.0, 4.0, 1.0, 0.6, 0.3])   # distinct population eigenvalues
EPS64 = np.finfo(np.float64).eps


def _gaussian_data(seed=0):
    rng = np.random.default_rng(seed)
    rot, _ = np.linalg.qr(rng.normal(size=(D, D)))
    return (rng.normal(size=(N, D)) * np.sqrt(LAM_POP)) @ rot.T + rng.normal(size=D)


def _affine(model):
    return lambda p, x: model.apply(p, x, method="affine")


def _closed_form_params(x, beta, noise_var=None):
    """LinearVAE parameters of `linear_vae_optimum`: W_d rows √ℓ_i u_iᵀ, b_d = x̄, encoder mean
    (WᵀW + βs²I)⁻¹Wᵀ(x − x̄) (rows √ℓ_i/λ_i u_iᵀ), log τ², log s²."""
    mean, lam, u = ae.covariance_eigh(x)
    opt = ae.linear_vae_optimum(lam, Q, beta, noise_var)
    w = u[:, :Q] * jnp.sqrt(opt.col_sq_norms)                      # (d, q)
    v = (w / (opt.col_sq_norms + beta * opt.noise_var)).T          # (q, d)
    params = {"enc_kernel": v.T, "enc_bias": -v @ mean, "enc_logvar": jnp.log(opt.encoder_var),
              "dec_kernel": w.T, "dec_bias": mean}
    if noise_var is None:
        params["dec_logvar"] = jnp.log(opt.noise_var)
    return {"params": params}, opt


@functools.partial(jax.jit, static_argnums=0)
def _derivatives(model, params, x, beta):
    """(f, ∇f, ∇²f) of the exact linear-VAE objective in the flattened parameters (β traced: one compile per
    model structure)."""
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    f = lambda v: ae.linear_vae_loss(_affine(model), beta)(unravel(v), None, {"x": x})[0]
    return f(flat), jax.grad(f)(flat), jax.hessian(f)(flat)


@pytest.mark.parametrize("beta,noise_var,active", [(1.0, None, 2), (1.5, None, 2), (2.5, None, 1), (1.0, 0.5, 2),
                                                  (2.0, 2.5, 1)])
def test_linear_vae_closed_form_is_a_stationary_minimum(beta, noise_var, active):
    """The derived β-linear-VAE optimum (module docstring) checked on its own, without an optimiser: at the
    closed-form parameters the exact objective equals `linear_vae_optimum(...).objective`, its gradient vanishes and
    its Hessian is PSD (a local minimum), including the collapsed cases (k < q active dimensions: β = 2.5 with
    learned s², β s² = 5 > λ₂ with fixed s²). Tolerances: float64 rounding of N-term sums, N ε₆₄ · scale, with the
    scale ~ max λ / s² ≲ 20 for the gradient."""
    with jax.enable_x64(True):
        x = jnp.asarray(_gaussian_data())
        model = LinearVAE(D, Q, decoder_logvar=None if noise_var is None else math.log(noise_var))
        params, opt = _closed_form_params(x, beta, noise_var)
        assert int(jnp.sum(opt.col_sq_norms > 0)) == active
        value, grad, hess = _derivatives(model, params, x, beta)
        tol = N * EPS64 * 20
        np.testing.assert_allclose(value, opt.objective, rtol=0, atol=tol)
        assert float(jnp.max(jnp.abs(grad))) < tol
        assert float(jnp.min(jnp.linalg.eigvalsh(hess))) > -1e3 * tol
        if beta == 1.0 and noise_var is None:   # ... and it is PPCA: objective = −ℓ*
            _, lam, _ = ae.covariance_eigh(x)
            np.testing.assert_allclose(-opt.objective, ae.ppca_max_log_likelihood(lam, Q), rtol=0, atol=tol)


def test_ppca_fit_attains_the_closed_form_likelihood():
    """ℓ(W_ML, μ, σ²_ML) on the data = −½[d log 2π + Σ_{≤q} log λ + (d−q) log σ² + d], and perturbing W or σ²
    lowers it (a maximum)."""
    with jax.enable_x64(True):
        x = jnp.asarray(_gaussian_data())
        _, lam, _ = ae.covariance_eigh(x)
        ppca = ae.ppca_fit(x, Q)
        best = float(jnp.mean(ae.ppca_log_likelihood(x, ppca)))
        np.testing.assert_allclose(best, ae.ppca_max_log_likelihood(lam, Q), rtol=0, atol=N * EPS64 * 10)
        np.testing.assert_allclose(ppca.noise_var, np.mean(np.asarray(lam)[Q:]), rtol=1e-12)
        for other in (ppca._replace(weight=ppca.weight * 1.01), ppca._replace(noise_var=ppca.noise_var * 0.99)):
            assert float(jnp.mean(ae.ppca_log_likelihood(x, other))) < best


def _train_linear_vae(params, x, beta, model, steps=300):
    """Full-batch L-BFGS (backtracking Armijo line search) on the exact objective, `steps` iterations."""
    f = lambda p: ae.linear_vae_loss(_affine(model), beta)(p, None, {"x": x})[0]
    opt = optax.lbfgs(linesearch=optax.scale_by_backtracking_linesearch(max_backtracking_steps=15, store_grad=True))
    value_and_grad = optax.value_and_grad_from_state(f)

    def step(carry, _):
        p, state = carry
        value, grad = value_and_grad(p, state=state)
        updates, state = opt.update(grad, state, p, value=value, grad=grad, value_fn=f)
        return (optax.apply_updates(p, updates), state), None

    return jax.lax.scan(step, (params, opt.init(params)), None, length=steps)[0][0]


def _sin_max_angle(w, u):
    """sin of the largest principal angle between span(w) and span(u) (u orthonormal): ‖(I − uuᵀ) orth(w)‖₂
    (accurate near 0, unlike arccos of the cosines)."""
    qw, _ = np.linalg.qr(w)
    return np.linalg.norm(qw - u @ (u.T @ qw), 2)


def test_linear_vae_reaches_ppca_and_beta_ppca():
    """Full-batch L-BFGS (float64) on the exact linear-VAE objective from a random init, β = 1 and β = 1.5 (one
    compile: β is traced). Tolerances derived at the final point θ from the quadratic model of the objective
    (checked: the Hessian H is positive definite there): the remaining gap is ½ gᵀH⁻¹g (the Newton decrement) and
    the parameter error the Newton step δ = −H⁻¹g; we allow twice these (third-order slack) plus float64 rounding
    N ε₆₄ (1 + |f|) of the N-term mean. The subspace error is first order, sin θ ≤ ‖δW‖_F / σ_q(W) (Wedin), the
    noise-variance error |δ log s²| s², the column norms' |2 w_iᵀδw_i| (columns sorted: R is a signed permutation).
    β = 1: (a) the ELBO per example equals the PPCA maximum ℓ*, sandwiched by the learned decoder's exact marginal
    likelihood ELBO ≤ ℓ_θ ≤ ℓ* (tight ELBO, Lucas et al. 2019); (b) span(W_d) = top-q principal subspace;
    (c) s² = σ²_ML. β = 1.5: the same against `linear_vae_optimum` (‖w_i‖² = λ_i − βs², s² = Σ_{j>q} λ_j/(d − βq))."""
    with jax.enable_x64(True):
        x = jnp.asarray(_gaussian_data())
        _, lam, u = ae.covariance_eigh(x)
        model = LinearVAE(D, Q)
        init = _random_params(jax.eval_shape(model.init, jax.random.PRNGKey(0), x[:1]), scale=0.5)
        train = jax.jit(lambda p, beta: _train_linear_vae(p, x, beta, model))
        for beta in (1.0, 1.5):
            p = train(init, beta)
            value, grad, hess = _derivatives(model, p, x, beta)
            newton_step = jax.flatten_util.ravel_pytree(p)[1](-jnp.linalg.solve(hess, grad))
            decrement = 0.5 * grad @ jnp.linalg.solve(hess, grad)
            opt = ae.linear_vae_optimum(lam, Q, beta)
            assert float(jnp.min(jnp.linalg.eigvalsh(hess))) > 0
            rounding = N * EPS64 * (1 + abs(float(opt.objective)))
            gap = float(value - opt.objective)
            assert -rounding <= gap <= 2 * float(decrement) + rounding, (beta, gap, float(decrement))
            w = np.asarray(p["params"]["dec_kernel"]).T
            dw = np.asarray(newton_step["params"]["dec_kernel"]).T
            sin_theta = _sin_max_angle(w, np.asarray(u[:, :Q]))
            assert sin_theta <= 2 * np.linalg.norm(dw) / np.linalg.svd(w, compute_uv=False)[-1] + 1e-12, sin_theta
            s2 = float(jnp.exp(p["params"]["dec_logvar"]))
            ds2 = abs(float(newton_step["params"]["dec_logvar"])) * s2
            assert abs(s2 - float(opt.noise_var)) <= 2 * ds2 + 1e-12
            order = np.argsort(-np.sum(w ** 2, axis=0))        # R is a signed permutation: sort the columns
            d_norms = np.abs(2 * np.sum(w * dw, axis=0))[order]  # first-order change of ‖w_i‖² along δ
            assert np.all(np.abs(np.sum(w ** 2, axis=0)[order] - opt.col_sq_norms) <= 2 * d_norms + 1e-12)
            if beta == 1.0:
                elbo = -float(value)
                ll_star = float(ae.ppca_max_log_likelihood(lam, Q))
                ll_theta = float(jnp.mean(ae.ppca_log_likelihood(
                    x, ae.PPCA(jnp.asarray(w), p["params"]["dec_bias"], jnp.asarray(s2)))))
                assert elbo <= ll_theta + rounding and ll_theta <= ll_star + rounding
                assert ll_star - elbo <= 2 * float(decrement) + rounding
                np.testing.assert_allclose(opt.noise_var, np.mean(np.asarray(lam)[Q:]), rtol=1e-12)
                trained = p
        # The sampled estimator `vae_loss` agrees with the exact objective at the optimum: the mean of the
        # one-sample NELBO is within 5 standard errors (from the per-example spread) of the exact value.
        enc = lambda p, x: model.apply(p, x, method="encode")
        dec = lambda p, z: model.apply(p, z, method="decode")
        _, aux = jax.jit(ae.vae_loss(enc, dec))(trained, jax.random.PRNGKey(1), {"x": x})
        exact = ae.linear_vae_loss(_affine(model))(trained, None, {"x": x})[1]
        diff = aux["nelbo"] - exact["nelbo"]
        assert abs(float(jnp.mean(diff))) < 5 * float(jnp.std(diff)) / math.sqrt(N)
        np.testing.assert_allclose(aux["kl"], exact["kl"], rtol=1e-12)


def test_gaussian_kl_and_nll_closed_forms():
    """KL(N(μ, σ²) ‖ N(0, 1)) against a Monte-Carlo E_q[log q − log p] (5 standard errors); the NLL against the
    normal log-density."""
    mean, logvar = jnp.array([[0.7, -1.2, 0.0]]), jnp.array([[-0.5, 0.8, 0.0]])
    eps = jax.random.normal(jax.random.PRNGKey(0), (200_000, 3))
    z = mean + jnp.exp(0.5 * logvar) * eps
    log_ratio = jnp.sum(jax.scipy.stats.norm.logpdf(z, mean, jnp.exp(0.5 * logvar))
                        - jax.scipy.stats.norm.logpdf(z), axis=-1)
    kl = float(ae.gaussian_kl(mean, logvar)[0])
    assert abs(kl - float(jnp.mean(log_ratio))) < 5 * float(jnp.std(log_ratio)) / math.sqrt(z.shape[0])
    x = jnp.array([[0.3, 2.0, -1.0]])
    np.testing.assert_allclose(ae.gaussian_nll(x, mean, logvar),
                               -jnp.sum(jax.scipy.stats.norm.logpdf(x, mean, jnp.exp(0.5 * logvar))), rtol=1e-6)


def test_vae_loss_noise_follows_the_example_index():
    """Per-example noise comes from fold_in(rng, index): the batch split in halves (with their indices) gives the
    same per-example values; aux carries recon, kl, nelbo = recon + kl and objective = recon + β kl."""
    model = VAE(data_dim=3, latent_dim=2, hidden=(16,))
    x = jax.random.normal(jax.random.PRNGKey(0), (6, 3))
    params = _random_params(jax.eval_shape(model.init, jax.random.PRNGKey(1), x), scale=0.5)
    loss = jax.jit(ae.vae_loss(lambda p, x: model.apply(p, x, method="encode"),
                               lambda p, z: model.apply(p, z, method="decode"), beta=0.5, num_samples=2))
    rng = jax.random.PRNGKey(2)
    value, aux = loss(params, rng, {"x": x})
    halves = [loss(params, rng, {"x": x[s], "index": jnp.arange(6)[s]})[1] for s in (slice(0, 3), slice(3, 6))]
    np.testing.assert_allclose(np.concatenate([h["nelbo"] for h in halves]), aux["nelbo"], rtol=1e-5)
    np.testing.assert_allclose(aux["nelbo"], aux["recon"] + aux["kl"], rtol=1e-6)
    np.testing.assert_allclose(value, jnp.mean(aux["recon"] + 0.5 * aux["kl"]), rtol=1e-6)


def test_straight_through_gradient_is_the_identity():
    """d recon / d z_e through `quantize` equals d recon / d z_q at z_q bitwise (a nonlinear decoder), the codebook
    gets no reconstruction gradient, and β sits on the commitment term: ∇_{z_e} = 2β(z_e − e), ∇_e = 2(e − z_e)."""
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    z_e, codebook, a = jax.random.normal(k1, (8, 4, 3)), jax.random.normal(k2, (6, 3)), jax.random.normal(k3, (3, 3))

    @jax.jit
    def grads(z_e, codebook):
        recon = lambda z: jnp.sum(ae.squared_error(jnp.ones_like(z), jnp.tanh(z @ a) + z ** 2))
        z_st, codes, z_q = ae.quantize(z_e, codebook)
        through = jax.grad(lambda ze, cb: recon(ae.quantize(ze, cb)[0]), argnums=(0, 1))(z_e, codebook)
        commit = jax.grad(lambda ze: jnp.sum(ae.vq_terms(ze, ae.quantize(ze, codebook)[2], 0.25)[1]))(z_e)
        book = jax.grad(lambda cb: jnp.sum(ae.vq_terms(z_e, cb[codes], 0.25)[0]))(codebook)
        return z_st, codes, z_q, jax.grad(recon)(z_q), through, commit, book

    z_st, codes, z_q, g_q, (g_e, g_book), commit, book = grads(z_e, codebook)
    np.testing.assert_array_equal(g_e, g_q)
    np.testing.assert_array_equal(z_st, z_q)
    assert not np.any(np.asarray(g_book))
    np.testing.assert_array_equal(codes, np.argmin(np.sum((np.asarray(z_e)[..., None, :] - np.asarray(codebook)) ** 2,
                                                          -1), -1))
    np.testing.assert_allclose(commit, 0.5 * (z_e - z_q), rtol=1e-6)
    np.testing.assert_allclose(book, jax.ops.segment_sum(2 * (z_q - z_e).reshape(-1, 3), codes.ravel(), 6),
                               rtol=1e-5, atol=1e-6)


K, SIGMA, PER = 4, 0.05, 500   # 4 balanced clusters of 500 points at (±5, ±5), noise σ = 0.05


def _clusters():
    rng = np.random.default_rng(0)
    centres = np.array([[5.0, 5.0], [-5.0, 5.0], [5.0, -5.0], [-5.0, -5.0]])
    labels = np.repeat(np.arange(K), PER)
    x = (centres[labels] + SIGMA * rng.normal(size=(K * PER, 2))).astype(np.float32)
    within = sum(np.sum((x[labels == j] - x[labels == j].mean(0)) ** 2) for j in range(K)) / len(x)
    return jnp.asarray(x), within


@pytest.mark.parametrize("ema", [False, True])
def test_vq_codebook_learns_the_cluster_means(ema):
    """Identity encoder/decoder on k = 4 well-separated balanced clusters, a k-entry codebook from k-means++ plus
    N(0, 0.5²) offsets (assignments stay right: the clusters are 10 apart). Trained by full-batch SGD(lr 1) on the
    codebook term (e_j ← ½(e_j + x̄_j): a factor ½ per step) or by EMA (γ = 0.9, error γ^t), every code is used with
    perplexity exactly k (balanced clusters) and the quantisation error E‖z_e − e‖² equals the within-cluster sample
    variance (to float32 rounding, 1e-4 relative). That variance is σ² χ²_{d(N−k)} / N: within 4 standard deviations
    (relative sd √(2/(d(N−k))) ≈ 2.2%) of its mean d σ² (1 − k/N)."""
    x, within = _clusters()
    n, d = x.shape
    expected = d * SIGMA ** 2 * (1 - K / n)
    assert abs(within - expected) < 4 * expected * math.sqrt(2 / (d * (n - K)))
    init = ae.kmeans_plus_plus(jax.random.PRNGKey(0), x, K)
    init = init + 0.5 * jax.random.normal(jax.random.PRNGKey(1), init.shape)
    ident = lambda p, v: v
    if ema:
        loss = ae.vq_vae_loss(ident, ident, decay=0.9)

        @jax.jit
        def run(state):
            step = lambda s, _: (loss(None, None, {"x": x}, codebook_state=s)[1]["codebook_state"], None)
            state = jax.lax.scan(step, state, None, length=300)[0]
            return loss(None, None, {"x": x}, codebook_state=state)[1]

        aux = run(ae.ema_codebook_init(init))
    else:
        loss = ae.vq_vae_loss(ident, ident, codebook_fn=lambda p: p)
        opt = optax.sgd(1.0)

        @jax.jit
        def run(codebook):
            def step(carry, _):
                cb, state = carry
                grad = jax.grad(lambda c: loss(c, None, {"x": x})[0])(cb)
                updates, state = opt.update(grad, state)
                return (optax.apply_updates(cb, updates), state), None
            cb = jax.lax.scan(step, (codebook, opt.init(codebook)), None, length=60)[0][0]
            return loss(cb, None, {"x": x})[1]

        aux = run(init)
    assert int(aux["usage"]) == K
    np.testing.assert_allclose(aux["perplexity"], K, rtol=1e-6)
    np.testing.assert_allclose(jnp.mean(aux["codebook"]), within, rtol=1e-4)
    np.testing.assert_allclose(aux["commitment"], 0.25 * aux["codebook"], rtol=1e-5)


def test_ema_update_formula():
    """One EMA step against the formulas written out: N' = γN + (1−γ)n, m' = γm + (1−γ)Σz, e = m'/Ñ."""
    state = ae.ema_codebook_init(jnp.array([[0.0, 0.0], [1.0, 1.0], [3.0, 0.0]]))
    z = jnp.array([[0.2, 0.0], [0.0, 0.4], [1.0, 2.0]])
    new = ae.ema_codebook_update(state, z, jnp.array([0, 0, 1]), decay=0.5, eps=0.1)
    size = np.array([0.5 + 1.0, 0.5 + 0.5, 0.5])
    total = size.sum()
    smoothed = (size + 0.1) / (total + 0.3) * total
    sums = 0.5 * np.asarray(state.embed_sum) + 0.5 * np.array([[0.2, 0.4], [1.0, 2.0], [0.0, 0.0]])
    np.testing.assert_allclose(new.cluster_size, size, rtol=1e-6)
    np.testing.assert_allclose(new.codebook, sums / smoothed[:, None], rtol=1e-6)
    counts, perplexity = ae.codebook_usage(jnp.array([0, 0, 1, 2]), 4)
    np.testing.assert_allclose(perplexity, np.exp(-(0.5 * np.log(0.5) + 2 * 0.25 * np.log(0.25))), rtol=1e-6)


def _conv_params(k, cin, cout):
    return k * k * cin * cout + cout


def _expected_kl_ae_params(f, c, features, out=3):
    """Parameter count written out from the architecture: conv k²·cin·cout + cout, GroupNorm 2C,
    ResBlock(C) = 2 GN(C) + 2 conv3(C, C)."""
    levels = int(math.log2(f))
    widths = [features * min(2 ** i, 4) for i in range(levels + 1)]
    res = lambda w: 4 * w + 2 * _conv_params(3, w, w)
    enc = _conv_params(3, out, widths[0]) + res(widths[-1]) + 2 * widths[-1] + _conv_params(3, widths[-1], 2 * c)
    enc += sum(res(widths[i]) + _conv_params(3, widths[i], widths[i + 1]) for i in range(levels))
    dec = _conv_params(3, c, widths[-1]) + res(widths[-1]) + 2 * widths[0] + _conv_params(3, widths[0], out)
    dec += sum(res(widths[i + 1]) + _conv_params(3, widths[i + 1], widths[i]) for i in range(levels))
    return enc + dec


@pytest.mark.parametrize("f", [2, 4, 8])
@pytest.mark.parametrize("size", [16, 32])
def test_kl_autoencoder_shapes_and_parameter_count(f, size):
    """encode: (B, H, W, 3) -> mean, logvar (B, H/f, W/f, c); decode back to (B, H, W, 3); parameter count by
    eval_shape equals the count written out from the architecture (no compile)."""
    model = KLAutoencoder(f=f, latent_channels=4, features=8)
    x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    mean, logvar = jax.eval_shape(lambda v, x: model.apply(v, x, method="encode"), variables, x)
    assert mean.shape == logvar.shape == (2, size // f, size // f, 4)
    out = jax.eval_shape(lambda v, z: model.apply(v, z, method="decode"), variables, mean)
    assert out.shape == (2, size, size, 3)
    assert count_params(variables) == _expected_kl_ae_params(f, 4, 8)
    vq = VQAutoencoder(f=f, num_codes=16, code_dim=3, features=8)
    vq_vars = jax.eval_shape(vq.init, jax.random.PRNGKey(0), x)
    assert jax.eval_shape(lambda v, x: vq.apply(v, x, method="encode"), vq_vars, x).shape == (2, size // f,
                                                                                           size // f, 3)
    assert vq_vars["params"]["codebook"].shape == (16, 3)


def _random_params(shapes, scale=0.1, seed=0):
    """N(0, scale²) numpy values of the eval_shape'd variables (skips compiling the RNG-heavy `init`)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda s: jnp.asarray(scale * rng.normal(size=s.shape), s.dtype), shapes)


def test_kl_autoencoder_forward_and_loss():
    """One tiny forward through `vae_loss` with the pluggable pixel-MSE reconstruction and LDM's β = 1e-6:
    finite, per-example aux, KL of the encoder's (mean, logvar) in closed form."""
    model = KLAutoencoder(f=2, latent_channels=2, features=8)
    x = jax.random.uniform(jax.random.PRNGKey(0), (2, 16, 16, 3), minval=-1, maxval=1)
    params = _random_params(jax.eval_shape(model.init, jax.random.PRNGKey(1), x))
    encode = lambda p, x: model.apply(p, x, method="encode")
    loss = ae.vae_loss(encode, lambda p, z: model.apply(p, z, method="decode"), beta=1e-6,
                       recon_loss=ae.squared_error)
    value, aux = jax.jit(loss)(params, jax.random.PRNGKey(2), {"x": x})
    assert np.isfinite(float(value)) and aux["recon"].shape == aux["kl"].shape == (2,)
    np.testing.assert_allclose(aux["kl"], ae.gaussian_kl(*encode(params, x)), rtol=1e-5)


def test_bad_arguments_fail_fast():
    ident = lambda p, v: v
    with pytest.raises(ValueError, match="exactly one"):
        ae.vq_vae_loss(ident, ident)
    with pytest.raises(ValueError, match="codebook_state"):
        ae.vq_vae_loss(ident, ident, decay=0.99)(None, None, {"x": jnp.zeros((2, 3))})
    with pytest.raises(ValueError, match="power of 2"):
        jax.eval_shape(KLAutoencoder(f=3).init, jax.random.PRNGKey(0), jnp.zeros((1, 12, 12, 3)))
    with pytest.raises(ValueError, match="key 'x'"):
        ae.vae_loss(ident, ident)(None, jax.random.PRNGKey(0), {"y": jnp.zeros((2, 3))})
