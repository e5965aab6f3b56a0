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
the data (and `batch["y"]` its classes for a class-conditional network, `num_classes` > 0), `aux =
{"losses": per-example losses, "t": times or labels}`; jit- and grad-safe.

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

from sdejax.guidance import check_classes
from sdejax.precond import Precond, lognormal_sigmas
from sdejax.sampling.loop import check_batch_axis
from sdejax.score import from_eps, resolve_precond
from sdejax.sde import SDE, batch_broadcast

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


def _check_batch(batch: dict) -> Array:
    if "x" not in batch:
        raise ValueError(f"batch must be a dict with key 'x'; got keys {sorted(batch)}")
    check_batch_axis("batch['x']", jnp.shape(batch["x"]))
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


def _class_conditioning(batch: dict, keys: Array, num_classes: int, p_uncond: float) -> dict:
    """{"y": classes} for a class-conditional network ({} without classes): `batch["y"]`, each replaced
    by the null class `num_classes` with probability `p_uncond` (classifier-free guidance's label
    dropout; u ~ U[0, 1) from fold_in(key, 1) of the example's time key)."""
    if num_classes <= 0:
        return {}
    if "y" not in batch:
        raise ValueError(f"a class-conditional loss (num_classes={num_classes}) needs batch['y']; "
                         f"got keys {sorted(batch)}")
    y = check_classes("batch['y']", batch["y"], batch["x"].shape[0], num_classes)
    if p_uncond > 0:
        u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 1)))(keys)
        y = jnp.where(u < p_uncond, num_classes, y)
    return {"y": y}


def _check_conditioning(num_classes: int, p_uncond: float) -> None:
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0; got {num_classes}")
    if not 0.0 <= p_uncond <= 1.0 or (p_uncond > 0 and num_classes == 0):
        raise ValueError(f"p_uncond must be in [0, 1] and needs num_classes > 0; got p_uncond={p_uncond} "
                         f"with num_classes={num_classes}")


def _denoising_losses(params, apply_fn, train, rng, x0, z, labels, alpha, sigma, precond: Precond, weight,
                      reduce_mean, cond: dict):
    """reduce(weight ⊙ (F − F_target)²) per example (weight per example or, for a per-dimension
    schedule, per dimension), x_t = α x_0 + σ z, F_target from the target of
    kind `precond.output` (`Precond.target_F`; the plain network output and its target otherwise);
    `cond` holds the class labels of a conditional network."""
    a, s = batch_broadcast(alpha, x0), batch_broadcast(sigma, x0)
    xt = a * x0 + s * z
    c_in, _, _ = (batch_broadcast(v, x0) for v in precond.scalings(alpha, sigma))
    out = apply_fn(params, xt if precond.sigma_data is None else c_in * xt, labels, train=train, rng=rng, **cond)
    kind = precond.output
    target = x0 if kind == "x0" else from_eps(kind, z, xt, alpha, sigma)
    if precond.sigma_data is not None:
        target = precond.target_F(target, xt, alpha, sigma)
    return _reduce(batch_broadcast(weight, out) * jnp.square(out - target), reduce_mean)


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


TIME_SAMPLINGS = ("uniform", "importance", "lognormal")


def _draw_times(sde: SDE, u: Array, how: str, eps: float, grid, p_mean: float, p_std: float):
    """(t, weight 1/(q(t)(T − eps)) relative to uniform) for u ~ U[0, 1) ("uniform", "importance") or
    u ~ N(0, 1) ("lognormal": ln σ̃ ~ N(P_mean, P_std²), t = t(λ = −2 ln σ̃), weight 1)."""
    if how == "importance":
        t, q = _importance_times(u, *grid)
        return t, 1.0 / (q * (sde.T - eps))
    if how == "lognormal":
        return sde.t_from_log_snr(-2.0 * jnp.log(lognormal_sigmas(u, p_mean, p_std))), jnp.ones_like(u)
    return eps + u * (sde.T - eps), jnp.ones_like(u)


def _loss_weight(sde: SDE, precond: Precond, t, alpha, sigma, likelihood_weighting: bool) -> Array:
    """The weight on ‖F − F_target‖²: plain MSE (σ² for score outputs, as the original), or g² on the
    score error, i.e. g² c_out² / (σ k_p)² (module docstring)."""
    if likelihood_weighting:
        g2 = sde.coefficients(t)[1] ** 2
        return g2 * jnp.square(precond.output_scale(alpha, sigma) / (sigma * _eps_scale(precond.output, alpha, sigma)))
    return sigma**2 if precond.output == "score" else jnp.ones_like(sigma)


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
    precond: Precond | None = None,
    time_sampling: str = "uniform",
    p_mean: float = -1.2,
    p_std: float = 1.2,
    num_classes: int = 0,
    p_uncond: float = 0.0,
) -> LossFn:
    """Continuous DSM: E_{t, x_0, z} [λ(t) ‖ŝ(x_t, t) − (−z/σ_t)‖²], the network read through `precond`
    (default: the schedule's, `sde.default_precond`), t ~ U[eps, T] by default.

    λ = σ² in score space (the original), the plain MSE on the network output otherwise (module
    docstring), or g² with `likelihood_weighting`. `importance_weighting` (likelihood weighting only;
    or `time_sampling="importance"`) draws t from q(t) ∝ g²/σ² and multiplies by 1/(q(t)(T − eps)).
    `time_sampling="lognormal"` is EDM's ln σ̃ ~ N(p_mean, p_std²); with `Precond.edm` and the plain
    weight this is EDM's loss, λ(σ) = (σ² + σ_d²)/(σ σ_d)² on ‖x̂₀ − x₀‖² (= ‖F − F_target‖²).
    With `num_classes` > 0 the network is class-conditional on `batch["y"]`, each label dropped to
    the null class with probability `p_uncond` (classifier-free guidance training).
    """
    _check_conditioning(num_classes, p_uncond)
    precond = resolve_precond(sde, precond, prediction, continuous)
    how = "importance" if importance_weighting else time_sampling
    if how not in TIME_SAMPLINGS:
        raise ValueError(f"unknown time_sampling {time_sampling!r}; valid: {list(TIME_SAMPLINGS)}")
    if how == "importance" and not likelihood_weighting:
        raise ValueError("importance_weighting samples t for the likelihood-weighted loss; "
                         "set likelihood_weighting=True")
    if not sde.t_min <= eps < sde.T:
        raise ValueError(f"eps must lie in [t_min={sde.t_min}, T={sde.T}); got {eps}")
    if not p_std > 0:
        raise ValueError(f"p_std must be > 0; got {p_std}")
    grid = tuple(jnp.asarray(v, jnp.float32) for v in log_snr_inverse_cdf(sde, eps)) if how == "importance" else None

    def loss_fn(params: Any, rng: Array, batch: dict) -> tuple[Array, dict]:
        x0 = _check_batch(batch)
        t_keys, z_keys, net_rng = _example_keys(rng, batch)
        draw = jax.random.normal if how == "lognormal" else jax.random.uniform
        u = jax.vmap(lambda k: draw(k, (), x0.dtype))(t_keys)
        t, time_weight = _draw_times(sde, u, how, eps, grid, p_mean, p_std)
        labels, alpha, sigma = precond.inputs(sde, t)
        weight = _loss_weight(sde, precond, t, alpha, sigma, likelihood_weighting)
        z = _per_example_normal(z_keys, x0)
        cond = _class_conditioning(batch, t_keys, num_classes, p_uncond)
        losses = _denoising_losses(params, apply_fn, train, net_rng, x0, z, labels, alpha, sigma,
                                   precond, weight * batch_broadcast(time_weight, weight), reduce_mean, cond)
        return jnp.mean(losses), {"losses": losses, "t": t}

    return loss_fn


def _discrete_loss_fn(apply_fn, train, reduce_mean, alphas, sigmas, prediction, num_classes, p_uncond) -> LossFn:
    """Labels i ~ U{0..N−1} with x_i = α_i x_0 + σ_i z; σ²-weighted for score outputs, else plain MSE
    (class-conditional as `get_sde_loss_fn`)."""
    _check_conditioning(num_classes, p_uncond)
    alphas, sigmas = jnp.asarray(alphas, jnp.float32), jnp.asarray(sigmas, jnp.float32)

    def loss_fn(params: Any, rng: Array, batch: dict) -> tuple[Array, dict]:
        x0 = _check_batch(batch)
        l_keys, z_keys, net_rng = _example_keys(rng, batch)
        labels = jax.vmap(lambda k: jax.random.randint(k, (), 0, sigmas.shape[0]))(l_keys)
        alpha, sigma = alphas[labels], sigmas[labels]
        weight = sigma**2 if prediction == "score" else jnp.ones_like(sigma)
        z = _per_example_normal(z_keys, x0)
        cond = _class_conditioning(batch, l_keys, num_classes, p_uncond)
        losses = _denoising_losses(params, apply_fn, train, net_rng, x0, z, labels, alpha, sigma,
                                   Precond.plain(prediction), weight, reduce_mean, cond)
        return jnp.mean(losses), {"losses": losses, "t": labels}

    return loss_fn


def _chain_table(sde: SDE, name: str, message: str) -> np.ndarray:
    """The discrete table `name` of the schedule's chain, or a ValueError saying which schedules have one."""
    table = getattr(sde, name, None)
    if table is None:
        raise ValueError(f"{message}; got {type(sde).__name__}")
    return np.asarray(table)


def get_ddpm_loss_fn(vpsde: SDE, apply_fn: ApplyFn, train: bool, reduce_mean: bool = True, num_classes: int = 0,
                     p_uncond: float = 0.0) -> LossFn:
    """DDPM L_simple (Ho et al. 2020): E_{i, x_0, z} ‖ε̂(sqrt(ᾱ_i) x_0 + sqrt(1 − ᾱ_i) z, i) − z‖².

    Labels are the integer indices i into `vpsde.alphas_cumprod`, as the discrete VP score function.
    """
    abar = _chain_table(vpsde, "alphas_cumprod", "the DDPM loss needs a schedule with a DDPM chain (VPSDE, DiscreteVPSDE)")
    return _discrete_loss_fn(apply_fn, train, reduce_mean, np.sqrt(abar), np.sqrt(1.0 - abar), "eps", num_classes,
                             p_uncond)


def get_smld_loss_fn(vesde: SDE, apply_fn: ApplyFn, train: bool, reduce_mean: bool = False, num_classes: int = 0,
                     p_uncond: float = 0.0) -> LossFn:
    """SMLD / NCSN loss (Song & Ermon 2019): E_{i, x_0, z} σ_i² ‖ŝ(x_0 + σ_i z, i) + z/σ_i‖² (0.5·sum).

    Labels index the descending σ table `vesde.discrete_sigmas[::-1]`, as the discrete VE score function.
    """
    sigmas = _chain_table(vesde, "discrete_sigmas", "the SMLD loss needs a schedule with an SMLD σ table (VESDE)")[::-1]
    return _discrete_loss_fn(apply_fn, train, reduce_mean, np.ones_like(sigmas), sigmas, "score", num_classes,
                             p_uncond)
