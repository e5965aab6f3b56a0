"""Denoising score-matching losses: continuous DSM (weightings, parameterisations), DDPM, SMLD.

Every loss perturbs data as x_t = α x_0 + σ z (z ~ N(0, I)) and regresses the network output on the
target implied by z in the network's own parameterisation (`sdejax.score`):

    score: −z/σ,   eps: z,   x0: x_0,   v: α z − σ x_0.

The error e_p in parameterisation p is a multiple of the noise error e_ε = ε̂ − z and of the score
error e_s = ŝ − s (s = −z/σ the DSM target): e_ε = −σ e_s and e_p = k_p e_ε with

    k_score = −1/σ,   k_eps = 1,   k_x0 = −σ/α,   k_v = (α² + σ²)/α,

so the plain MSE on the target of p is ‖e_p‖² = σ² k_p² ‖e_s‖², a weight λ_p(t) on score matching:

    score: the original's σ²‖e_s‖² is kept, λ = σ²
    eps:   λ = σ² (the same objective as score; the original VP loss)
    x0:    λ = σ⁴/α² (σ² times 1/SNR, emphasises large t)
    v:     λ = σ²(α² + σ²)²/α² (σ²/α² for VP).

Likelihood weighting replaces λ by g(t)² (the weight for which the loss bounds −log p, Song et al.
2021 "Maximum likelihood training of score-based diffusion models"), i.e. the weight on ‖e_p‖² is
g²/(σ k_p)². Each factory returns `loss_fn(params, rng, batch) -> (loss, aux)` with `batch["x"]`
the data, `aux = {"losses": per-example losses, "t": times or labels}`; jit- and grad-safe.

Per-example randomness (t or label, z) is drawn from `fold_in(key, i)` with i the example's global
index in the step's batch, `batch["index"]` (default 0..n−1). A data-parallel or gradient-
accumulated step that passes each shard its global indices therefore draws exactly the noise of
the unsplit batch, whatever the device count. The network's own key (dropout) folds in the first
index, so devices and microbatches draw distinct dropout masks.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from sdejax.score import DEFAULT_PREDICTION, PREDICTIONS, from_eps, network_inputs
from sdejax.sde import SDE, VESDE, VPSDE, batch_broadcast, subVPSDE

Array = jax.Array
ApplyFn = Callable[..., Array]
LossFn = Callable[[Any, Array, dict], tuple[Array, dict]]


def _reduce(sq: Array, reduce_mean: bool) -> Array:
    """Per-example reduction over non-batch axes: mean, or 0.5·sum as the original."""
    flat = jnp.reshape(sq, (sq.shape[0], -1))
    return jnp.mean(flat, axis=-1) if reduce_mean else 0.5 * jnp.sum(flat, axis=-1)


def _eps_scale(prediction: str, alpha: Array, sigma: Array) -> Array:
    """k_p with e_p = k_p e_ε (see module docstring)."""
    if prediction == "score":
        return -1.0 / sigma
    if prediction == "eps":
        return jnp.ones_like(sigma)
    if prediction == "x0":
        return -sigma / alpha
    return (alpha**2 + sigma**2) / alpha


def _resolve_prediction(sde: SDE, prediction: str | None) -> str:
    prediction = DEFAULT_PREDICTION.get(type(sde), "score") if prediction is None else prediction
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; valid: {list(PREDICTIONS)}")
    return prediction


def _check_batch(batch: dict) -> Array:
    if "x" not in batch:
        raise ValueError(f"batch must be a dict with key 'x'; got keys {sorted(batch)}")
    return batch["x"]


def _example_keys(rng: Array, batch: dict) -> tuple[Array, Array, Array]:
    """(time/label keys, noise keys) per example, fold_in(k, index), and the network key."""
    n = batch["x"].shape[0]
    index = batch.get("index")
    index = jnp.arange(n) if index is None else index
    if index.shape != (n,):
        raise ValueError(f"batch['index'] must have shape ({n},); got {index.shape}")
    t_rng, z_rng, net_rng = jax.random.split(rng, 3)
    fold = jax.vmap(jax.random.fold_in, in_axes=(None, 0))
    return fold(t_rng, index), fold(z_rng, index), jax.random.fold_in(net_rng, index[0])


def _per_example_normal(keys: Array, x0: Array) -> Array:
    return jax.vmap(lambda k: jax.random.normal(k, x0.shape[1:], x0.dtype))(keys)


def _denoising_losses(params, apply_fn, train, rng, x0, z, labels, alpha, sigma, prediction, weight, reduce_mean):
    """weight · reduce(‖out − target_p‖²) per example, with x_t = α x_0 + σ z."""
    a, s = batch_broadcast(alpha, x0), batch_broadcast(sigma, x0)
    xt = a * x0 + s * z
    out = apply_fn(params, xt, labels, train=train, rng=rng)
    target = x0 if prediction == "x0" else from_eps(prediction, z, xt, alpha, sigma)
    return weight * _reduce(jnp.square(out - target), reduce_mean)


def log_snr_inverse_cdf(sde: SDE, eps: float, n: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Grid (t_i, F_i) of F(t) = log(σ_t²/α_t²) = −log SNR(t), strictly increasing, on [eps, T].

    For any linear SDE, g² = dσ²/dt − 2σ² d log α/dt, hence g²/σ² = dF/dt: the importance density
    q(t) ∝ g²/σ² has CDF (F(t) − F(eps)) / (F(T) − F(eps)). The grid mixes uniform and geometric
    points so the steep start of F (VP: F ≈ log(β_min t)) is resolved.
    """
    t = np.unique(np.concatenate([np.linspace(eps, sde.T, n), np.geomspace(eps, sde.T, n)]))
    t = t.astype(np.float32)
    alpha, sigma = (np.asarray(v, np.float64) for v in sde.marginal_coeffs(jnp.asarray(t)))
    f = (2.0 * (np.log(sigma) - np.log(alpha))).astype(np.float32)
    keep = [0]  # drop points where float32 rounding leaves t or F not strictly increasing
    for i in range(1, t.shape[0]):
        if t[i] > t[keep[-1]] and f[i] > f[keep[-1]]:
            keep.append(i)
    return t[keep], f[keep]


def _importance_times(u: Array, grid_t: Array, grid_f: Array) -> tuple[Array, Array]:
    """t ~ q from u ~ U[0, 1), q the piecewise-uniform density with CDF linear between the grid
    points (t_i, F_i), and its density q(t) = (F_{i+1} − F_i) / ((t_{i+1} − t_i)(F_end − F_0))."""
    f = grid_f[0] + u * (grid_f[-1] - grid_f[0])
    i = jnp.clip(jnp.searchsorted(grid_f, f, side="right") - 1, 0, grid_f.shape[0] - 2)
    df, dt = grid_f[i + 1] - grid_f[i], grid_t[i + 1] - grid_t[i]
    t = grid_t[i] + (f - grid_f[i]) / df * dt
    return t, df / dt / (grid_f[-1] - grid_f[0])


def get_sde_loss_fn(
    sde: SDE,
    apply_fn: ApplyFn,
    train: bool,
    reduce_mean: bool = True,
    continuous: bool = True,
    likelihood_weighting: bool = False,
    importance_weighting: bool = False,
    eps: float = 1e-5,
    prediction: str | None = None,
) -> LossFn:
    """Continuous-time DSM: E_{t, x_0, z} [λ(t) ‖ŝ(x_t, t) − (−z/σ_t)‖²] with t ~ U[eps, T].

    λ = σ² in score space (the original), the plain MSE for eps/x0/v outputs (module docstring),
    or g² with `likelihood_weighting`. `importance_weighting` (likelihood weighting only) draws t
    from q(t) ∝ g²/σ² and multiplies by 1/(q(t)(T − eps)), an unbiased estimator of the same
    expectation with far lower variance (the weight becomes nearly constant in t).
    """
    prediction = _resolve_prediction(sde, prediction)
    if importance_weighting and not likelihood_weighting:
        raise ValueError("importance_weighting samples t for the likelihood-weighted loss; "
                         "set likelihood_weighting=True")
    if not 0 < eps < sde.T:
        raise ValueError(f"eps must lie in (0, T={sde.T}); got {eps}")
    if importance_weighting:
        grid_t, grid_f = (jnp.asarray(v, jnp.float32) for v in log_snr_inverse_cdf(sde, eps))

    def loss_fn(params: Any, rng: Array, batch: dict) -> tuple[Array, dict]:
        x0 = _check_batch(batch)
        t_keys, z_keys, net_rng = _example_keys(rng, batch)
        u = jax.vmap(lambda k: jax.random.uniform(k, (), x0.dtype))(t_keys)
        if importance_weighting:
            t, q = _importance_times(u, grid_t, grid_f)
            time_weight = 1.0 / (q * (sde.T - eps))
        else:
            t = eps + u * (sde.T - eps)
            time_weight = jnp.ones_like(t)
        alpha, sigma = sde.marginal_coeffs(t)
        if likelihood_weighting:
            g2 = sde.sde(jnp.zeros_like(x0), t)[1] ** 2
            weight = g2 / jnp.square(sigma * _eps_scale(prediction, alpha, sigma))
        else:
            weight = sigma**2 if prediction == "score" else jnp.ones_like(sigma)
        labels, _, _ = network_inputs(sde, t, continuous)
        z = _per_example_normal(z_keys, x0)
        losses = _denoising_losses(params, apply_fn, train, net_rng, x0, z, labels, alpha, sigma,
                                   prediction, weight * time_weight, reduce_mean)
        return jnp.mean(losses), {"losses": losses, "t": t}

    return loss_fn


def _discrete_loss_fn(apply_fn, train, reduce_mean, alphas, sigmas, prediction) -> LossFn:
    """Labels i ~ U{0..N−1} with x_i = α_i x_0 + σ_i z; σ²-weighted for score outputs, else plain MSE."""
    alphas, sigmas = jnp.asarray(alphas, jnp.float32), jnp.asarray(sigmas, jnp.float32)

    def loss_fn(params: Any, rng: Array, batch: dict) -> tuple[Array, dict]:
        x0 = _check_batch(batch)
        l_keys, z_keys, net_rng = _example_keys(rng, batch)
        labels = jax.vmap(lambda k: jax.random.randint(k, (), 0, sigmas.shape[0]))(l_keys)
        alpha, sigma = alphas[labels], sigmas[labels]
        weight = sigma**2 if prediction == "score" else jnp.ones_like(sigma)
        z = _per_example_normal(z_keys, x0)
        losses = _denoising_losses(params, apply_fn, train, net_rng, x0, z, labels, alpha, sigma,
                                   prediction, weight, reduce_mean)
        return jnp.mean(losses), {"losses": losses, "t": labels}

    return loss_fn


def get_ddpm_loss_fn(vpsde: VPSDE, apply_fn: ApplyFn, train: bool, reduce_mean: bool = True) -> LossFn:
    """DDPM L_simple (Ho et al. 2020): E_{i, x_0, z} ‖ε̂(sqrt(ᾱ_i) x_0 + sqrt(1 − ᾱ_i) z, i) − z‖².

    Labels are the integer indices i into `vpsde.alphas_cumprod`, as the discrete VP score function.
    """
    if not isinstance(vpsde, VPSDE) or isinstance(vpsde, subVPSDE):
        raise ValueError(f"the DDPM loss needs a VPSDE (its discrete β table); got {type(vpsde).__name__}")
    abar = vpsde.alphas_cumprod
    return _discrete_loss_fn(apply_fn, train, reduce_mean, np.sqrt(abar), np.sqrt(1.0 - abar), "eps")


def get_smld_loss_fn(vesde: VESDE, apply_fn: ApplyFn, train: bool, reduce_mean: bool = False) -> LossFn:
    """SMLD / NCSN loss (Song & Ermon 2019): E_{i, x_0, z} σ_i² ‖ŝ(x_0 + σ_i z, i) + z/σ_i‖² (0.5·sum).

    Labels index the descending σ table `vesde.discrete_sigmas[::-1]`, as the discrete VE score function.
    """
    if not isinstance(vesde, VESDE):
        raise ValueError(f"the SMLD loss needs a VESDE (its σ table); got {type(vesde).__name__}")
    sigmas = vesde.discrete_sigmas[::-1]
    return _discrete_loss_fn(apply_fn, train, reduce_mean, np.ones_like(sigmas), sigmas, "score")
