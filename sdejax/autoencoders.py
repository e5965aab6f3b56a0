"""Autoencoder objectives: the (β-)VAE, the linear VAE and its PPCA closed form, the VQ-VAE.

VAE. Encoder q(z|x) = N(μ(x), diag σ²(x)), prior N(0, I), decoder p(x|z); z = μ + σ ⊙ ε, ε ~ N(0, I).
Per example

    L(x) = −E_q log p(x|z) + KL(q(z|x) ‖ N(0, I)) ≥ −log p(x),   KL = ½ Σ_j (μ_j² + σ_j² − 1 − log σ_j²),

and the β-VAE minimises recon + β KL (β = 1: the VAE).

PPCA (Tipping & Bishop 1999). x = W z + μ + ε, z ~ N(0, I_q), ε ~ N(0, σ² I_d): x ~ N(μ, WWᵀ + σ² I). With
S = (1/N) Σ (x − x̄)(x − x̄)ᵀ, eigenvalues λ_1 ≥ … ≥ λ_d, eigenvectors U: μ = x̄, σ²_ML = Σ_{j>q} λ_j / (d − q),
W_ML = U_q (Λ_q − σ² I)^{1/2} R, and the maximal mean log-likelihood is
    ℓ* = −½ [d log 2π + Σ_{j≤q} log λ_j + (d − q) log σ²_ML + d].

Linear β-VAE. Encoder mean V x + c, x-independent variances D = diag(τ²); decoder N(W z + b, s² I). Then
E_q log p(x|z) = log N(x; W m + b, s² I) − tr(W D Wᵀ) / (2 s²) exactly. With orthogonal columns w_i = √ℓ_i u_i and
r_i = ℓ_i / (ℓ_i + β s²), the optimal V, c, D, b reduce the mean objective to
    ½ [d log 2π s² + tr S / s² + Σ_i (−r_i a_i / s² − β log(1 − r_i))],   a_i = u_iᵀ S u_i,
minimised by r_i = 1 − β s² / λ_i on the top eigenvectors: ℓ_i = λ_i − β s² and τ_i² = β s² / λ_i where
λ_i > β s², else w_i = 0, τ_i² = 1 (posterior collapse). Learned s²: s² = Σ_{j>k} λ_j / (d − β k) for k active
dimensions. β = 1 gives PPCA with a tight ELBO (Lucas et al. 2019, "Don't blame the ELBO").

VQ-VAE (van den Oord et al. 2017). z_q = e_k, k = argmin_j ‖z_e − e_j‖²; straight-through; loss
recon + ‖sg(z_e) − e‖² + β ‖z_e − sg(e)‖² (β = 0.25 on the commitment term), or an EMA codebook.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

Array = jax.Array
LossFn = Callable[..., tuple[Array, dict]]
ReconLoss = Callable[[Array, Any], Array]


def _per_example_sum(v: Array) -> Array:
    return jnp.sum(jnp.reshape(v, (v.shape[0], -1)), axis=-1)


def _check_x(batch: dict) -> Array:
    if "x" not in batch:
        raise ValueError(f"batch must be a dict with key 'x'; got keys {sorted(batch)}")
    x = jnp.asarray(batch["x"])
    if x.ndim < 2:
        raise ValueError(f"batch['x'] must have shape (batch, ...); got {x.shape}")
    return x


# ----------------------------------------------------------------------------------------------- VAE


def gaussian_nll(x: Array, mean: Array, logvar: Array) -> Array:
    """−log N(x; mean, diag e^logvar) per example (B,): ½ Σ [log 2π + logvar + (x − mean)² e^−logvar]."""
    logvar = jnp.broadcast_to(logvar, x.shape)
    return 0.5 * _per_example_sum(math.log(2 * math.pi) + logvar + (x - mean) ** 2 * jnp.exp(-logvar))


def gaussian_kl(mean: Array, logvar: Array) -> Array:
    """KL(N(μ, diag e^logvar) ‖ N(0, I)) per example (B,): ½ Σ (μ² + e^logvar − 1 − logvar)."""
    logvar = jnp.broadcast_to(logvar, mean.shape)
    return 0.5 * _per_example_sum(mean ** 2 + jnp.exp(logvar) - 1.0 - logvar)


def gaussian_recon(x: Array, decoded: tuple[Array, Array]) -> Array:
    """Reconstruction −log p(x|z) for a decoder returning (mean, logvar) (logvar learned or fixed)."""
    mean, logvar = decoded
    return gaussian_nll(x, mean, logvar)


def squared_error(x: Array, decoded: Array) -> Array:
    """Σ (x − x̂)² per example (B,) for a decoder returning x̂: the pixel-MSE reconstruction
    (= 2 s² (Gaussian NLL − const) with fixed s²; LDM's L2 term). LPIPS/adversarial terms plug in here."""
    return _per_example_sum((x - decoded) ** 2)


def vae_loss(encode_fn: Callable[[Any, Array], tuple[Array, Array]], decode_fn: Callable[[Any, Array], Any],
             beta: float = 1.0, recon_loss: ReconLoss = gaussian_recon, num_samples: int = 1) -> LossFn:
    """loss_fn(params, rng, batch) -> (mean of recon + β KL, aux) for x = batch["x"] (B, ...).

    encode_fn(params, x) -> (μ, log σ²) (B, ...latent); decode_fn(params, z) -> what `recon_loss(x, decoded)`
    takes ((mean, logvar) for `gaussian_recon`, x̂ for `squared_error`). z = μ + σ ε with num_samples draws per
    example from fold_in(rng, index), index = batch["index"] (default 0..B−1), so the noise does not depend on the
    batch split. aux (B,): "recon" (MC mean), "kl" (closed form), "nelbo" = recon + kl (the bound on −log p(x)
    when recon is an NLL), "objective" = recon + β kl."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1; got {num_samples}")

    def loss_fn(params, rng, batch):
        x = _check_x(batch)
        mean, logvar = encode_fn(params, x)
        keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, batch.get("index", jnp.arange(x.shape[0])))
        eps = jax.vmap(lambda k: jax.random.normal(k, (num_samples,) + mean.shape[1:], mean.dtype))(keys)
        z = mean[:, None] + jnp.exp(0.5 * logvar)[:, None] * eps
        recon = jnp.mean(jax.vmap(lambda zs: recon_loss(x, decode_fn(params, zs)), in_axes=1)(z), axis=0)
        kl = gaussian_kl(mean, logvar)
        objective = recon + beta * kl
        return jnp.mean(objective), {"recon": recon, "kl": kl, "nelbo": recon + kl, "objective": objective}

    return loss_fn


# ------------------------------------------------------------------------------- linear VAE and PPCA


def linear_gaussian_expected_nll(x: Array, z_mean: Array, z_logvar: Array, kernel: Array, bias: Array,
                                 logvar: Array) -> Array:
    """E_{z ~ N(m, diag τ²)} −log N(x; z K + b, s² I) in closed form (B,), K (q, d):
    −log N(x; m K + b, s² I) + Σ_i τ_i² ‖K_i‖² / (2 s²)."""
    tau2 = jnp.broadcast_to(jnp.exp(z_logvar), z_mean.shape)
    return gaussian_nll(x, z_mean @ kernel + bias, logvar) + 0.5 * jnp.exp(-logvar) * tau2 @ jnp.sum(kernel ** 2, -1)


def linear_vae_loss(affine_fn: Callable[[Any, Array], tuple[Array, ...]], beta: float = 1.0) -> LossFn:
    """loss_fn(params, rng, batch) -> (mean recon + β KL, aux) of a linear-Gaussian decoder, exact (no sampling).

    affine_fn(params, x) -> (z_mean (B, q), z_logvar, dec_kernel (q, d), dec_bias (d,), dec_logvar ())
    (`LinearVAE.affine`). aux (B,) as in `vae_loss`; rng is unused."""

    def loss_fn(params, rng, batch):
        x = _check_x(batch)
        z_mean, z_logvar, kernel, bias, logvar = affine_fn(params, x)
        recon = linear_gaussian_expected_nll(x, z_mean, z_logvar, kernel, bias, logvar)
        kl = gaussian_kl(z_mean, z_logvar)
        objective = recon + beta * kl
        return jnp.mean(objective), {"recon": recon, "kl": kl, "nelbo": recon + kl, "objective": objective}

    return loss_fn


class PPCA(NamedTuple):
    """x ~ N(mean, weight weightᵀ + noise_var I); weight (d, q)."""

    weight: Array
    mean: Array
    noise_var: Array


def covariance_eigh(x: Array) -> tuple[Array, Array, Array]:
    """(x̄, eigenvalues descending (d,), eigenvectors (d, d) as columns) of S = (1/N) Σ (x − x̄)(x − x̄)ᵀ."""
    mean = jnp.mean(x, axis=0)
    xc = x - mean
    lam, u = jnp.linalg.eigh(xc.T @ xc / x.shape[0])
    return mean, lam[::-1], u[:, ::-1]


def ppca_fit(x: Array, latent_dim: int) -> PPCA:
    """Maximum-likelihood PPCA (R = I): σ² = mean of the d − q discarded eigenvalues, W = U_q (Λ_q − σ² I)^{1/2}."""
    mean, lam, u = covariance_eigh(x)
    noise_var = jnp.mean(lam[latent_dim:])
    return PPCA(u[:, :latent_dim] * jnp.sqrt(lam[:latent_dim] - noise_var), mean, noise_var)


def ppca_log_likelihood(x: Array, ppca: PPCA) -> Array:
    """log N(x; μ, W Wᵀ + σ² I) per example (B,)."""
    d = x.shape[-1]
    chol = jnp.linalg.cholesky(ppca.weight @ ppca.weight.T + ppca.noise_var * jnp.eye(d, dtype=x.dtype))
    white = jax.scipy.linalg.solve_triangular(chol, (x - ppca.mean).T, lower=True)
    return -0.5 * (d * math.log(2 * math.pi) + 2 * jnp.sum(jnp.log(jnp.diag(chol))) + jnp.sum(white ** 2, axis=0))


def ppca_max_log_likelihood(eigvals: Array, latent_dim: int) -> Array:
    """ℓ* = −½ [d log 2π + Σ_{j≤q} log λ_j + (d − q) log σ²_ML + d], eigenvalues in descending order."""
    d = eigvals.shape[0]
    noise_var = jnp.mean(eigvals[latent_dim:])
    return -0.5 * (d * math.log(2 * math.pi) + jnp.sum(jnp.log(eigvals[:latent_dim]))
                   + (d - latent_dim) * jnp.log(noise_var) + d)


class LinearVAEOptimum(NamedTuple):
    """Global optimum of the linear β-VAE: ‖w_i‖² = (λ_i − β s²)₊, encoder variances τ_i², s², mean objective."""

    col_sq_norms: Array
    encoder_var: Array
    noise_var: Array
    objective: Array


def _linear_vae_objective(lam: Array, active: Array, noise_var: Array, beta: float) -> Array:
    d, q = lam.shape[0], active.shape[0]
    k = jnp.sum(active)
    lam_q = lam[:q]
    return 0.5 * (d * math.log(2 * math.pi) + (d - beta * k) * jnp.log(noise_var)
                  + (jnp.sum(lam) - jnp.sum(jnp.where(active, lam_q, 0.0))) / noise_var
                  + beta * k * (1.0 - math.log(beta)) + beta * jnp.sum(jnp.where(active, jnp.log(lam_q), 0.0)))


def linear_vae_optimum(eigvals: Array, latent_dim: int, beta: float = 1.0,
                       noise_var: Optional[float] = None) -> LinearVAEOptimum:
    """Closed-form optimum of mean(recon + β KL) for the linear VAE on data with covariance eigenvalues `eigvals`
    (descending). With the k leading dimensions active (λ_i > β s²) the objective is
        ½ [d log 2π + (d − βk) log s² + Σ_{j>k} λ_j / s² + βk (1 − log β) + β Σ_{i≤k} log λ_i];
    learned s² (noise_var None): s² = Σ_{j>k} λ_j / (d − βk), minimised over the feasible k ≤ q (β static)."""
    lam = jnp.asarray(eigvals)
    d, idx = lam.shape[0], jnp.arange(latent_dim)
    if noise_var is None:
        cands = []
        for k in range(latent_dim + 1):
            if d - beta * k > 0:
                s2 = jnp.sum(lam[k:]) / (d - beta * k)
                feasible = jnp.all(jnp.where(idx < k, lam[:latent_dim] > beta * s2, True))
                cands.append((jnp.where(feasible, _linear_vae_objective(lam, idx < k, s2, beta), jnp.inf), s2, k))
        objs, s2s, ks = (jnp.stack([jnp.asarray(c) for c in v]) for v in zip(*cands))
        s2, active = s2s[jnp.argmin(objs)], idx < ks[jnp.argmin(objs)]
    else:
        s2 = jnp.asarray(noise_var, lam.dtype)
        active = lam[:latent_dim] > beta * s2
    return LinearVAEOptimum(jnp.where(active, lam[:latent_dim] - beta * s2, 0.0),
                            jnp.where(active, beta * s2 / lam[:latent_dim], 1.0), s2,
                            _linear_vae_objective(lam, active, s2, beta))


# ---------------------------------------------------------------------------------------------- VQ-VAE


def quantize(z_e: Array, codebook: Array) -> tuple[Array, Array, Array]:
    """(z_st, codes, z_q) for z_e (..., D), codebook (K, D): codes = argmin_j ‖z_e − e_j‖², z_q = e_codes, and the
    straight-through z_st = sg(z_q) + (z_e − sg(z_e)): its value is z_q bitwise (z_e − z_e = 0 exactly, unlike
    z_e + sg(z_q − z_e)), its Jacobian w.r.t. z_e is the identity and it passes no gradient to the codebook."""
    dist = (jnp.sum(z_e ** 2, -1, keepdims=True) - 2 * z_e @ codebook.T + jnp.sum(codebook ** 2, -1))
    codes = jnp.argmin(dist, axis=-1)
    z_q = codebook[codes]
    return jax.lax.stop_gradient(z_q) + (z_e - jax.lax.stop_gradient(z_e)), codes, z_q


def vq_terms(z_e: Array, z_q: Array, beta: float = 0.25) -> tuple[Array, Array]:
    """(codebook, commitment) per example (B,): Σ ‖sg(z_e) − e‖² and β Σ ‖z_e − sg(e)‖² (VQ-VAE; β on the
    encoder term, not taming's `legacy` swap)."""
    sg = jax.lax.stop_gradient
    return _per_example_sum((sg(z_e) - z_q) ** 2), beta * _per_example_sum((z_e - sg(z_q)) ** 2)


def codebook_usage(codes: Array, num_codes: int) -> tuple[Array, Array]:
    """(counts (K,), perplexity exp(H(p))) of the code histogram p = counts / Σ counts (0 log 0 = 0)."""
    counts = jnp.sum(jax.nn.one_hot(jnp.ravel(codes), num_codes), axis=0)
    p = counts / jnp.sum(counts)
    return counts, jnp.exp(-jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)))


class CodebookState(NamedTuple):
    """EMA codebook: codes e_i = m_i / Ñ_i, counts N_i (K,), sums m_i (K, D)."""

    codebook: Array
    cluster_size: Array
    embed_sum: Array


def ema_codebook_init(codebook: Array) -> CodebookState:
    """State with N_i = 1, m_i = e_i (consistent: m_i / N_i = e_i)."""
    return CodebookState(codebook, jnp.ones(codebook.shape[:1], codebook.dtype), codebook)


def ema_codebook_update(state: CodebookState, z_e: Array, codes: Array, decay: float = 0.99, eps: float = 1e-5,
                        axis_name: Optional[str] = None) -> CodebookState:
    """N ← γN + (1−γ) n, m ← γm + (1−γ) Σ_{codes=i} z_e, Ñ = (N + ε)/(Σ N + Kε) Σ N (Laplace), e = m / Ñ.
    axis_name: psum n and the sums over that mapped axis (data parallel), so all replicas agree."""
    num_codes, dim = state.codebook.shape
    onehot = jax.nn.one_hot(jnp.ravel(codes), num_codes, dtype=state.embed_sum.dtype)
    n = jnp.sum(onehot, axis=0)
    sums = onehot.T @ jnp.reshape(jax.lax.stop_gradient(z_e), (-1, dim)).astype(onehot.dtype)
    if axis_name is not None:
        n, sums = jax.lax.psum((n, sums), axis_name)
    size = decay * state.cluster_size + (1 - decay) * n
    embed_sum = decay * state.embed_sum + (1 - decay) * sums
    total = jnp.sum(size)
    smoothed = (size + eps) / (total + num_codes * eps) * total
    return CodebookState(embed_sum / smoothed[:, None], size, embed_sum)


def kmeans_plus_plus(key: Array, z: Array, num_codes: int) -> Array:
    """Codebook init (K, D) from vectors z (..., D) by k-means++ (D² sampling): a remedy for dead codes."""
    z = jnp.reshape(z, (-1, z.shape[-1]))
    keys = jax.random.split(key, num_codes)
    first = z[jax.random.randint(keys[0], (), 0, z.shape[0])]
    d2 = jnp.sum((z - first) ** 2, -1)

    def body(i, carry):
        codebook, d2 = carry
        c = z[jax.random.categorical(keys[i], jnp.log(d2))]
        return codebook.at[i].set(c), jnp.minimum(d2, jnp.sum((z - c) ** 2, -1))

    init = jnp.zeros((num_codes, z.shape[-1]), z.dtype).at[0].set(first)
    return jax.lax.fori_loop(1, num_codes, body, (init, d2))[0]


def vq_vae_loss(encode_fn: Callable[[Any, Array], Array], decode_fn: Callable[[Any, Array], Any],
                codebook_fn: Optional[Callable[[Any], Array]] = None, beta: float = 0.25,
                recon_loss: ReconLoss = squared_error, decay: Optional[float] = None, eps: float = 1e-5,
                axis_name: Optional[str] = None) -> LossFn:
    """loss_fn(params, rng, batch, codebook_state=None) -> (mean recon + codebook + β commitment, aux).

    encode_fn(params, x) -> z_e (B, ..., D); decode_fn(params, z_q) -> what recon_loss(x, ·) takes. Either
    codebook_fn(params) -> (K, D), learned by the codebook term, or decay γ: the EMA codebook comes in as the extra
    `codebook_state` (`CodebookState`), the codebook term is dropped and aux["codebook_state"] is the updated state.
    aux: per example "recon", "codebook" (= the quantisation error Σ‖z_e − e‖²), "commitment"; "codes",
    "counts" (K,), "usage" (codes used), "perplexity"."""
    if (codebook_fn is None) == (decay is None):
        raise ValueError("give exactly one of codebook_fn (codebook learned by the loss) or decay (EMA codebook)")

    def loss_fn(params, rng, batch, codebook_state: Optional[CodebookState] = None):
        x = _check_x(batch)
        if decay is not None and codebook_state is None:
            raise ValueError("an EMA codebook (decay given) needs the codebook_state extra")
        z_e = encode_fn(params, x)
        codebook = codebook_fn(params) if decay is None else codebook_state.codebook
        z_st, codes, z_q = quantize(z_e, codebook)
        recon = recon_loss(x, decode_fn(params, z_st))
        codebook_term, commitment = vq_terms(z_e, z_q, beta)
        counts, perplexity = codebook_usage(codes, codebook.shape[0])
        aux = {"recon": recon, "codebook": codebook_term, "commitment": commitment, "codes": codes,
               "counts": counts, "usage": jnp.sum(counts > 0), "perplexity": perplexity}
        total = recon + commitment
        if decay is None:
            total = total + codebook_term
        else:
            aux["codebook_state"] = ema_codebook_update(codebook_state, z_e, codes, decay, eps, axis_name)
        return jnp.mean(total), aux

    return loss_fn
